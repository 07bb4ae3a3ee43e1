//! `imdsd doctor`: checks a setup piece by piece and says how to fix what is broken.
//!
//! It takes the daemon's own flags and reads the same environment, so `imdsd doctor FLAGS…` checks
//! exactly what `imdsd FLAGS…` would run. Every finding is one line on stdout:
//!
//! - `PASS <check>: <detail>`
//! - `FAIL <check>: <what is wrong> — fix: <how to fix it>`
//! - `SKIP <check>: <why the check does not apply>` (never a failure)
//!
//! The checks, in order: `config`, `docker`, `identity`, `roles`, `listen`, `network`,
//! `ec2-redirect`, `metadata-route`. Later checks use what earlier ones found (the Docker survey, the credential
//! source) and are skipped when it is missing, so one broken piece is reported once, where it is.
//! The exit code is 0 when nothing failed and 1 otherwise (a configuration that does not parse is
//! reported as `config` failures, not with the daemon's 64).
//!
//! The doctor changes nothing on the host. The one thing it does beyond reading is what the roles
//! check must do to be worth anything: one real `sts:AssumeRole` per role (the credentials are
//! discarded). Every network operation is bounded by a timeout, so it never hangs on an engine or
//! endpoint that does not answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptions, ListNetworksOptions};
use futures::StreamExt as _;
use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::clock::{SharedClock, SystemClock};
use crate::config::{self, Config, Parsed, SourceConfig};
use crate::credentials::fake::FakeSource;
use crate::credentials::sts::{StsSetupError, StsSource};
use crate::credentials::{AssumeRequest, CredentialSource, SourceError};
use crate::docker::{DockerOptions, InspectFailure, NetworkInfo, NetworkScope, served_networks};
use crate::identity::container::{self, Decision};
use crate::identity::role::{AccountContext, RoleArn};
use crate::index::Container;

/// `imdsd doctor` options: the daemon's own flags, checked as the daemon would use them.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// The daemon's flags (e.g. --config /etc/imdsd/imdsd.toml); its environment variables count too.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "DAEMON_FLAGS"
    )]
    pub daemon_args: Vec<String>,
}

/// Each Docker Engine call. A healthy engine answers in milliseconds.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(5);
/// The engine's `/info`, which Podman answers only after asking every tool it uses for its
/// version (seconds on a busy host).
const INFO_TIMEOUT: Duration = Duration::from_secs(20);
/// Resolving the operator's identity and `GetCallerIdentity`. Longer than the others because the
/// SDK retries a failed attempt itself (5 s per attempt), and its own error says more than ours.
const STS_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Each `AssumeRole`.
const STS_ASSUME_TIMEOUT: Duration = Duration::from_secs(10);
/// Asking a listen address whether imdsd (or EC2) answers there.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// Local commands (`iptables-save`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// AssumeRole calls in flight at once: enough to be quick, few enough not to be throttled.
const ASSUME_CONCURRENCY: usize = 4;
/// The session name of the doctor's own AssumeRole calls, so that CloudTrail says who made them.
const SESSION_NAME: &str = "imdsd-doctor";

const CONFIG: &str = "config";
const DOCKER: &str = "docker";
const IDENTITY: &str = "identity";
const ROLES: &str = "roles";
const LISTEN: &str = "listen";
const NETWORK: &str = "network";
const METADATA_ROUTE: &str = "metadata-route";
const NETWORKS: &str = "networks";
const EC2_REDIRECT: &str = "ec2-redirect";

/// Runs every check; returns the exit code (0 only if all pass).
pub async fn run(args: DoctorArgs) -> u8 {
    let env = |k: &str| std::env::var(k).ok();
    let mut report = Report::printing();
    let config = match check_config(&mut report, &args.daemon_args, &env) {
        ConfigOutcome::Valid(config) => config,
        ConfigOutcome::Info(text) => {
            // `imdsd doctor --help` after other flags reaches the daemon's parser: show its help.
            print!("{text}");
            return 0;
        }
        ConfigOutcome::Invalid => {
            for check in [
                DOCKER,
                IDENTITY,
                ROLES,
                LISTEN,
                NETWORK,
                EC2_REDIRECT,
                METADATA_ROUTE,
            ] {
                report.skip(check, "needs a valid configuration (see the config check)");
            }
            return report.finish();
        }
    };

    let docker = check_docker(&mut report, config.docker.as_ref()).await;
    let source = check_identity(&mut report, &config).await;
    check_roles(&mut report, &config, source.as_ref(), &docker).await;
    let on_host = check_listen(&mut report, &config.listen, &docker).await;
    check_network(&mut report, &on_host, &docker);
    check_ec2_redirect(&mut report, &|path| std::fs::read_to_string(path).ok()).await;
    check_metadata_route(&mut report, &config).await;
    report.finish()
}

// ---------------------------------------------------------------------------------------------
// Findings

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Fail,
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finding {
    status: Status,
    check: &'static str,
    detail: String,
    /// Only for failures.
    fix: Option<String>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.status {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Skip => "SKIP",
        };
        write!(f, "{word} {}: {}", self.check, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, " — fix: {fix}")?;
        }
        Ok(())
    }
}

/// The findings so far; printed as they come, so a slow check shows what already passed.
struct Report {
    findings: Vec<Finding>,
    print: bool,
}

impl Report {
    fn printing() -> Self {
        Self {
            findings: Vec::new(),
            print: true,
        }
    }

    #[cfg(test)]
    fn silent() -> Self {
        Self {
            findings: Vec::new(),
            print: false,
        }
    }

    fn add(&mut self, mut finding: Finding) {
        // One finding, one line: SDK errors arrive spread over several.
        finding.detail = one_line(&finding.detail);
        finding.fix = finding.fix.as_deref().map(one_line);
        if self.print {
            println!("{finding}");
        }
        self.findings.push(finding);
    }

    fn pass(&mut self, check: &'static str, detail: impl Into<String>) {
        self.add(Finding {
            status: Status::Pass,
            check,
            detail: detail.into(),
            fix: None,
        });
    }

    fn fail(&mut self, check: &'static str, what: impl Into<String>, fix: impl Into<String>) {
        self.add(Finding {
            status: Status::Fail,
            check,
            detail: what.into(),
            fix: Some(fix.into()),
        });
    }

    fn skip(&mut self, check: &'static str, why: impl Into<String>) {
        self.add(Finding {
            status: Status::Skip,
            check,
            detail: why.into(),
            fix: None,
        });
    }

    fn count(&self, status: Status) -> usize {
        self.findings.iter().filter(|f| f.status == status).count()
    }

    /// Prints the tally and returns the exit code.
    fn finish(&self) -> u8 {
        let failed = self.count(Status::Fail);
        if self.print {
            println!(
                "imdsd doctor: {} passed, {failed} failed, {} skipped",
                self.count(Status::Pass),
                self.count(Status::Skip)
            );
        }
        u8::from(failed > 0)
    }
}

/// Joins the lines of `text` with single spaces.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs `fut` for at most `limit`; both an error and the timeout become a message.
async fn bounded<T, E: std::error::Error>(
    limit: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!("no answer within {} s", limit.as_secs())),
    }
}

/// An error with its sources: bollard hides "permission denied" two levels down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// 1. config

enum ConfigOutcome {
    Valid(Box<Config>),
    Info(String),
    Invalid,
}

fn check_config(
    report: &mut Report,
    daemon_args: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> ConfigOutcome {
    let argv = std::iter::once("imdsd".to_string()).chain(daemon_args.iter().cloned());
    match config::parse(argv, env) {
        Ok(Parsed::Run(config)) => {
            let from = match &config.config_file {
                Some(path) => format!("{}, flags and environment", path.display()),
                None => "flags and environment; no configuration file".into(),
            };
            let listen: Vec<String> = config.listen.iter().map(ToString::to_string).collect();
            let source = match &config.source {
                SourceConfig::Fake { .. } => "fake credentials".to_string(),
                SourceConfig::Sts { profile, .. } => match profile {
                    Some(p) => format!("STS as profile {p:?}"),
                    None => "STS as the operator".into(),
                },
            };
            report.pass(
                CONFIG,
                format!(
                    "valid ({from}); listens on {}; credentials from {source}",
                    listen.join(", ")
                ),
            );
            ConfigOutcome::Valid(config)
        }
        Ok(Parsed::Info(text)) => ConfigOutcome::Info(text),
        Ok(Parsed::Probe(_) | Parsed::Doctor(_) | Parsed::Network(_)) => {
            report.fail(
                CONFIG,
                "the flags given name a tool (probe, doctor or network), not the daemon's flags",
                "give `imdsd doctor` the flags the daemon runs with, e.g. \
                 `imdsd doctor --config /etc/imdsd/imdsd.toml`",
            );
            ConfigOutcome::Invalid
        }
        Err(e) => {
            for problem in &e.problems {
                report.fail(
                    CONFIG,
                    problem.as_str(),
                    "correct this value where it is set (`imdsd --help` lists every flag and \
                     environment variable, imdsd.example.toml every file key); the daemon \
                     refuses to start (exit 64) until then",
                );
            }
            ConfigOutcome::Invalid
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. docker

/// What the Docker check learned, for the checks after it.
enum DockerState {
    /// `--docker-host none`, or no socket at the default path.
    Disabled,
    /// Configured but not usable; the docker check failed.
    Unavailable,
    Ready(Survey),
}

/// The engine as the daemon would see it.
#[derive(Debug, Default)]
struct Survey {
    /// "Docker" or "Podman", for messages.
    engine: &'static str,
    /// The engine runs rootless (see [`rootless`]).
    rootless: bool,
    networks: Vec<NetworkInfo>,
    /// The networks whose containers the daemon would serve.
    served_networks: BTreeSet<String>,
    /// Every running container's address → (container name, network name).
    holders: HashMap<IpAddr, (String, String)>,
    /// The running containers the daemon would serve, as its index would hold them.
    served: Vec<Container>,
}

async fn check_docker(report: &mut Report, options: Option<&DockerOptions>) -> DockerState {
    let Some(options) = options else {
        report.skip(
            DOCKER,
            "no Docker Engine configured (--docker-host none, or no /var/run/docker.sock): every \
             caller gets the mapping file and the default role",
        );
        return DockerState::Disabled;
    };
    match survey(options).await {
        Ok((summary, survey)) if survey.rootless => {
            report.fail(
                DOCKER,
                format!(
                    "{} answers: {summary}; it runs rootless, so its containers' addresses live \
                     in the user's own network namespace (slirp4netns, pasta or RootlessKit): \
                     imdsd on the host can neither be reached at a network's gateway nor tell \
                     callers apart",
                    options.host,
                ),
                "use the rootful engine: for Podman, `sudo systemctl enable --now podman.socket` \
                 and --docker-host unix:///run/podman/podman.sock (or CONTAINER_HOST), with \
                 networks from `sudo imdsd network up --engine podman`; for Docker, the system \
                 daemon at unix:///var/run/docker.sock",
            );
            DockerState::Unavailable
        }
        Ok((summary, survey)) => {
            report.pass(DOCKER, format!("{} answers: {summary}", options.host));
            check_served_networks(report, options, &survey);
            if let NetworkScope::Named(wanted) = &options.networks {
                for name in wanted {
                    if !survey.networks.iter().any(|n| &n.name == name) {
                        report.fail(
                            DOCKER,
                            format!(
                                "--networks names {name:?}, which this Docker Engine does not \
                                 have, so no container on it can get a role"
                            ),
                            format!(
                                "create the network (`imdsd network up`, or `docker network \
                                 create {name}`) or correct --networks"
                            ),
                        );
                    }
                }
            }
            DockerState::Ready(survey)
        }
        Err(problem) => {
            report.fail(
                DOCKER,
                format!(
                    "cannot use the Docker Engine at {}: {problem}",
                    options.host
                ),
                docker_fix(&problem, &options.host),
            );
            DockerState::Unavailable
        }
    }
}

/// Whether the engine at `host` runs rootless. Podman says so in a field of its own in `/info`
/// (`Rootless`, which Docker's API and so bollard's model do not have: read from the raw
/// answer), Docker in `SecurityOptions` (`name=rootless`).
async fn engine_rootless(docker: &Docker, host: &str) -> Result<bool, String> {
    // Podman gathers a lot for /info (every tool's version): seconds, not milliseconds.
    let Some(path) = host.strip_prefix("unix://") else {
        let info = bounded(INFO_TIMEOUT, docker.info()).await?;
        return Ok(rootless(
            info.security_options.as_deref().unwrap_or_default(),
            false,
            host,
        ));
    };
    let info = bounded(INFO_TIMEOUT, raw_get(path, "/info")).await?;
    let options: Vec<String> = info["SecurityOptions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.as_str().map(str::to_string))
        .collect();
    Ok(rootless(
        &options,
        info["Rootless"].as_bool() == Some(true),
        host,
    ))
}

/// `GET path` on the engine's unix socket, its JSON body.
async fn raw_get(socket: &str, path: &str) -> std::io::Result<serde_json::Value> {
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    // HTTP/1.0: the engine answers without chunking and closes.
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: engine\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&response[..0], |at| &response[at + 4..]);
    serde_json::from_slice(body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Whether an engine is rootless, from what `/info` says (Podman's `Rootless`; Docker's
/// `SecurityOptions` holding `name=rootless`) or, failing that, its socket's path (a user's
/// runtime directory, `/run/user/<uid>/…`).
fn rootless(security_options: &[String], podman_rootless: bool, host: &str) -> bool {
    podman_rootless
        || security_options
            .iter()
            .any(|o| o.split(',').any(|kv| kv.trim() == "name=rootless"))
        || host.starts_with("unix:///run/user/")
}

/// How to fix a Docker connection problem, most likely cause first.
fn docker_fix(problem: &str, host: &str) -> String {
    let general = format!(
        "is Docker running (`sudo systemctl start docker`)? Is --docker-host (now {host}) the \
         engine's address, e.g. unix:///var/run/docker.sock? Or run without containers with \
         --docker-host none"
    );
    let lower = problem.to_ascii_lowercase();
    if lower.contains("permission denied") || lower.contains("os error 13") {
        format!(
            "this user may not use the socket: add it to the docker group (`sudo usermod -aG \
             docker $USER`, then log in again) or run as root, as the daemon would; {general}"
        )
    } else {
        general
    }
}

/// Connects as the watcher does, then lists what the daemon would look at.
async fn survey(options: &DockerOptions) -> Result<(String, Survey), String> {
    let host = options.host.as_str();
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        Docker::connect_with_unix(path, DOCKER_TIMEOUT.as_secs(), bollard::API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_http(
            &host.replacen("tcp://", "http://", 1),
            DOCKER_TIMEOUT.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
    }
    .map_err(|e| error_chain(&e))?;
    // Speak the engine's own API version, as the watcher does, so old engines (API 1.41) work.
    let docker = bounded(DOCKER_TIMEOUT, docker.negotiate_version()).await?;
    bounded(DOCKER_TIMEOUT, docker.ping())
        .await
        .map_err(|e| format!("ping: {e}"))?;
    let version = bounded(DOCKER_TIMEOUT, docker.version())
        .await
        .map_err(|e| format!("version: {e}"))?;
    // Podman says so in its components (Docker's are "Engine", containerd, runc…).
    let podman = version
        .components
        .iter()
        .flatten()
        .any(|c| c.name == "Podman Engine");
    let rootless = engine_rootless(&docker, &options.host)
        .await
        .map_err(|e| format!("info: {e}"))?;
    let running = bounded(
        DOCKER_TIMEOUT,
        docker.list_containers(Some(ListContainersOptions {
            all: false,
            ..Default::default()
        })),
    )
    .await
    .map_err(|e| format!("listing containers: {e}"))?;
    let networks = bounded(
        DOCKER_TIMEOUT,
        docker.list_networks(None::<ListNetworksOptions>),
    )
    .await
    .map_err(|e| format!("listing networks: {e}"))?;

    let networks: Vec<NetworkInfo> = networks
        .iter()
        .filter_map(NetworkInfo::from_model)
        .collect();
    let local = match options.networks {
        NetworkScope::Carrying(_) => crate::docker::local_addresses(),
        _ => Vec::new(),
    };
    let mut survey = Survey {
        engine: if podman { "Podman" } else { "Docker" },
        rootless,
        served_networks: served_networks(&options.networks, &networks, &local),
        networks,
        ..Survey::default()
    };

    let count = running.len();
    for summary in running {
        let Some(id) = summary.id else { continue };
        let name = summary
            .names
            .unwrap_or_default()
            .first()
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.chars().take(12).collect());
        let endpoints = summary
            .network_settings
            .and_then(|s| s.networks)
            .unwrap_or_default();
        for (network, endpoint) in &endpoints {
            for address in [&endpoint.ip_address, &endpoint.global_ipv6_address]
                .into_iter()
                .flatten()
            {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    survey.holders.insert(ip, (name.clone(), network.clone()));
                }
            }
        }
        // Only containers the daemon would serve need their environment, which takes an inspect.
        if !endpoints.keys().any(|n| survey.served_networks.contains(n)) {
            continue;
        }
        match tokio::time::timeout(DOCKER_TIMEOUT, docker.inspect_container(&id, None)).await {
            Ok(Ok(details)) => {
                if let Some(c) = crate::docker::to_container(
                    details,
                    options,
                    &survey.served_networks,
                    &HashMap::new(),
                ) {
                    survey.served.push(c);
                }
            }
            // Stopped between the listing and the inspect (gone, or Podman's `stopped` record
            // before its cleanup): nothing to check.
            Ok(Err(e))
                if matches!(
                    crate::docker::inspect_failure(&e),
                    InspectFailure::Gone | InspectFailure::Unreadable { expected: true }
                ) => {}
            Ok(Err(e)) => return Err(format!("inspecting {name}: {}", error_chain(&e))),
            Err(_) => {
                return Err(format!(
                    "inspecting {name}: no answer within {} s",
                    DOCKER_TIMEOUT.as_secs()
                ));
            }
        }
    }

    let summary = format!(
        "{} {} (API {}), {count} running container{}, {} network{}",
        if podman { "Podman" } else { "Docker Engine" },
        version.version.as_deref().unwrap_or("?"),
        version.api_version.as_deref().unwrap_or("?"),
        plural(count),
        survey.networks.len(),
        plural(survey.networks.len()),
    );
    Ok((summary, survey))
}

/// Which networks' containers the daemon would serve, and a failure when that is none.
fn check_served_networks(report: &mut Report, options: &DockerOptions, survey: &Survey) {
    if survey.served_networks.is_empty() {
        report.fail(
            NETWORKS,
            format!(
                "no {} network is served ({}), so no container can get a role; a container \
                 calling from any network is refused",
                survey.engine,
                options.networks.describe()
            ),
            "listen on the metadata network's address (host mode: `imdsd network up`, then \
             --listen 169.254.169.254:80; compose: imdsd's address on the network), or name the \
             networks to serve with --networks",
        );
        return;
    }
    let names: Vec<&str> = survey.served_networks.iter().map(String::as_str).collect();
    let others: Vec<&str> = survey
        .networks
        .iter()
        .map(|n| n.name.as_str())
        .filter(|n| !survey.served_networks.contains(*n) && !["host", "none"].contains(n))
        .collect();
    report.pass(
        NETWORKS,
        format!(
            "serving containers on {} ({} running there; chosen as {}); refused from {}",
            names.join(", "),
            survey.served.len(),
            options.networks.describe(),
            if others.is_empty() {
                "no other network".to_string()
            } else {
                others.join(", ")
            }
        ),
    );
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

// ---------------------------------------------------------------------------------------------
// 3. identity

/// Where roles are assumed from, and the context to resolve role names in.
struct Source {
    source: Arc<dyn CredentialSource>,
    accounts: AccountContext,
    /// The operator's ARN; `None` for fake credentials.
    identity: Option<String>,
}

async fn check_identity(report: &mut Report, config: &Config) -> Option<Source> {
    let clock: SharedClock = Arc::new(SystemClock);
    match &config.source {
        SourceConfig::Fake { lifetime } => {
            // As the daemon does: offline, its own identity is the emulated instance's account.
            let accounts =
                config.account_context(&config.instance.account_id, config.instance.partition);
            let account = accounts.default_account.clone().unwrap_or_default();
            report.pass(
                IDENTITY,
                format!(
                    "fake credentials (--fake-credentials): offline, no AWS identity is needed \
                     or used; roles named without an account are in {account}"
                ),
            );
            Some(Source {
                source: Arc::new(FakeSource::new(*lifetime, clock)),
                accounts,
                identity: None,
            })
        }
        SourceConfig::Sts { .. } => {
            let options = config.sts_options()?;
            let unreachable_fix = "check the network path to STS (proxy, firewall, DNS), \
                                   --region and --sts-endpoint, then run the doctor again";
            let source =
                match tokio::time::timeout(STS_CONNECT_TIMEOUT, StsSource::connect(&options)).await
                {
                    Ok(Ok(source)) => source,
                    Ok(Err(StsSetupError::Identity(message))) => {
                        let (what, fix) = split_fix(&message);
                        report.fail(IDENTITY, what, fix);
                        return None;
                    }
                    Ok(Err(StsSetupError::Unreachable(message))) => {
                        report.fail(IDENTITY, message, unreachable_fix);
                        return None;
                    }
                    Err(_) => {
                        report.fail(
                            IDENTITY,
                            format!(
                                "resolving the operator's AWS identity and calling \
                             sts:GetCallerIdentity took more than {} s{}",
                                STS_CONNECT_TIMEOUT.as_secs(),
                                options
                                    .endpoint
                                    .as_ref()
                                    .map(|e| format!(" (STS at {e})"))
                                    .unwrap_or_default()
                            ),
                            unreachable_fix,
                        );
                        return None;
                    }
                };
            let identity = source.identity().clone();
            report.pass(
                IDENTITY,
                format!(
                    "{} (account {}), checked with sts:GetCallerIdentity{}{}",
                    identity.arn,
                    identity.account,
                    options
                        .endpoint
                        .as_ref()
                        .map(|e| format!(" at {e}"))
                        .unwrap_or_default(),
                    if identity.is_role_session {
                        "; a role session, so the roles it assumes are role chains, limited to \
                         one hour"
                    } else {
                        ""
                    }
                ),
            );
            let accounts = config.account_context(&identity.account, &identity.partition);
            Some(Source {
                source: Arc::new(source),
                accounts,
                identity: Some(identity.arn),
            })
        }
    }
}

/// Splits a message that carries its own "… Fix: …" into the two halves of a FAIL line.
fn split_fix(message: &str) -> (String, String) {
    match message.split_once(". Fix: ") {
        Some((what, fix)) => (what.to_string(), fix.to_string()),
        None => (
            message.to_string(),
            "follow the advice in the message; `aws sts get-caller-identity` (with the same \
             --profile) shows whether the identity works"
                .to_string(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// 4. roles

/// One AssumeRole to try, and everyone who needs it.
struct Wanted {
    request: AssumeRequest,
    by: Vec<String>,
}

async fn check_roles(
    report: &mut Report,
    config: &Config,
    source: Option<&Source>,
    docker: &DockerState,
) {
    let Some(source) = source else {
        report.skip(
            ROLES,
            "needs a working AWS identity to assume roles with (see the identity check)",
        );
        return;
    };
    let accounts = &source.accounts;
    let identity = &config.identity;
    let rules = &identity.containers;
    let mut wanted: Vec<Wanted> = Vec::new();
    let mut want = |request: AssumeRequest, by: String| {
        // Requests differing only in session name succeed or fail together.
        match wanted.iter_mut().find(|w| {
            w.request.role_arn == request.role_arn
                && w.request.external_id == request.external_id
                && w.request.policy == request.policy
        }) {
            Some(w) => w.by.push(by),
            None => wanted.push(Wanted {
                request,
                by: vec![by],
            }),
        }
    };
    let unresolvable_fix = "write the role as a full ARN or name@123456789012, or set \
                            --default-account-id / --account-map";

    if let Some(spec) = &identity.default_role {
        match spec.resolve(accounts) {
            Ok(arn) => want(AssumeRequest::new(arn, SESSION_NAME), "default role".into()),
            Err(e) => report.fail(ROLES, format!("default role: {e}"), unresolvable_fix),
        }
    }
    for (key, mapped) in identity.mapping.roles() {
        match mapped.spec.resolve(accounts) {
            Ok(arn) => {
                let mut request = AssumeRequest::new(
                    arn,
                    mapped
                        .session_name
                        .clone()
                        .unwrap_or_else(|| SESSION_NAME.into()),
                );
                request.external_id = mapped.external_id.clone();
                want(request, format!("mapping file entry {key:?}"));
            }
            Err(e) => report.fail(
                ROLES,
                format!("role mapping file entry {key:?}: {e}"),
                unresolvable_fix,
            ),
        }
    }
    let mut aliases: BTreeMap<String, RoleArn> = BTreeMap::new();
    for (alias, spec) in &rules.aliases {
        match spec.resolve(accounts) {
            Ok(arn) => {
                aliases.insert(alias.clone(), arn.clone());
                want(
                    AssumeRequest::new(arn, SESSION_NAME),
                    format!("role alias {alias:?}"),
                );
            }
            Err(e) => report.fail(
                ROLES,
                format!("role_aliases.{alias}: {e}"),
                unresolvable_fix,
            ),
        }
    }
    if let DockerState::Ready(survey) = docker {
        for c in &survey.served {
            let Some(request) = container::requested(rules, c) else {
                continue;
            };
            match container::decide(rules, &aliases, accounts, &request) {
                Decision::Grant { arn, .. } => {
                    let mut assume = AssumeRequest::new(arn, SESSION_NAME);
                    assume.external_id = container::external_id(rules, c);
                    assume.policy = container::policy(rules, c);
                    want(
                        assume,
                        format!("container {} ({})", c.name, request.from.describe()),
                    );
                }
                Decision::Refuse { code, message } => {
                    let fix = match code {
                        "InvalidRoleSpec" => format!(
                            "correct the container's {}: a role ARN, name, name@123456789012 or \
                             name@alias",
                            request.from.describe()
                        ),
                        _ if matches!(request.from, container::RequestSource::AliasLabel(_))
                            || rules.aliases_only =>
                        {
                            format!(
                                "define the alias {:?} in the role_aliases table of the \
                                 configuration file, or give the container an alias that exists",
                                request.value
                            )
                        }
                        _ => "add the role to --allowed-roles, or give the container a role \
                              the allow-list permits"
                            .to_string(),
                    };
                    report.fail(
                        ROLES,
                        format!("container {} ({}): {message}", c.name, c.short_id()),
                        fix,
                    );
                }
            }
        }
    }

    if wanted.is_empty() {
        report.skip(
            ROLES,
            "no role to check: no default role, mapping file, role_aliases, or running container \
             asking for one (callers get no role)",
        );
        return;
    }

    let fake = source.identity.is_none();
    let results: Vec<_> = futures::stream::iter(wanted.iter())
        .map(|w| async move {
            let outcome =
                tokio::time::timeout(STS_ASSUME_TIMEOUT, source.source.assume(&w.request)).await;
            (w, outcome)
        })
        .buffered(ASSUME_CONCURRENCY)
        .collect()
        .await;
    for (w, outcome) in results {
        let arn = &w.request.role_arn;
        let who = w.by.join("; ");
        match outcome {
            Ok(Ok(_)) if fake => report.pass(
                ROLES,
                format!("{arn} ({who}): fake credentials minted (offline; no AWS call is made)"),
            ),
            Ok(Ok(creds)) => report.pass(
                ROLES,
                format!(
                    "{arn} ({who}): assumed as {}, valid until {}",
                    creds.assumed_role_arn.as_deref().unwrap_or("?"),
                    crate::clock::format_iso8601(creds.expiration)
                ),
            ),
            Ok(Err(SourceError::Denied { message, .. })) => report.fail(
                ROLES,
                format!("{arn} ({who}): {message}"),
                format!(
                    "let {} assume the role: the role must exist, its trust policy must allow \
                     this identity to sts:AssumeRole{}, and the identity's own IAM policy must \
                     allow sts:AssumeRole on {arn}",
                    source
                        .identity
                        .as_deref()
                        .unwrap_or("the operator's identity"),
                    if w.request.external_id.is_some() {
                        " with this external id"
                    } else {
                        ""
                    }
                ),
            ),
            Ok(Err(SourceError::Unavailable(message))) => report.fail(
                ROLES,
                format!("{arn} ({who}): {message}"),
                "STS failed or could not be reached; check --region and --sts-endpoint and run \
                 the doctor again",
            ),
            Err(_) => report.fail(
                ROLES,
                format!(
                    "{arn} ({who}): AssumeRole got no answer within {} s",
                    STS_ASSUME_TIMEOUT.as_secs()
                ),
                "check the network path to STS, --region and --sts-endpoint, and run the doctor \
                 again",
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. listen

/// A listen address and whether it is an address of this host.
struct ListenAddr {
    addr: SocketAddr,
    on_host: bool,
}

async fn check_listen(
    report: &mut Report,
    addrs: &[SocketAddr],
    docker: &DockerState,
) -> Vec<ListenAddr> {
    let mut out = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let ip = addr.ip();
        // Port 0 first: whether the address exists, apart from whether the port is free.
        let on_host = match crate::server::bind_all(&[SocketAddr::new(ip, 0)]).await {
            Ok(_) => true,
            Err(e) => {
                let survey = match docker {
                    DockerState::Ready(survey) => Some(survey),
                    _ => None,
                };
                let holder = survey.and_then(|s| s.holders.get(&ip));
                // The daemon binds a network's gateway ahead (IP_FREEBIND): Podman puts it on the
                // bridge only while a container is attached.
                let gateway_of = survey.and_then(|s| {
                    s.networks
                        .iter()
                        .find(|n| n.subnets.iter().any(|(_, g)| *g == Some(ip)))
                        .map(|n| (s.engine, n.name.as_str()))
                });
                if let Some((engine, network)) = gateway_of {
                    report.pass(
                        LISTEN,
                        format!(
                            "{addr}: not an address of this host yet: the gateway of {engine} \
                             network {network}, which the engine puts on the network's bridge \
                             with its first container; imdsd listens there ahead of it"
                        ),
                    );
                    out.push(ListenAddr {
                        addr,
                        on_host: false,
                    });
                    continue;
                }
                match holder {
                    // The compose layout: imdsd runs in that container, and the doctor outside it.
                    Some((name, network)) if answers_like_imds(addr).await => report.pass(
                        LISTEN,
                        format!(
                            "{addr}: not an address of this host, but container {name} has it on \
                             network {network} (compose layout) and imdsd (or EC2) answers there"
                        ),
                    ),
                    Some((name, network)) => report.fail(
                        LISTEN,
                        format!(
                            "{addr}: container {name} has this address on network {network}, but \
                             nothing that answers like imdsd listens there"
                        ),
                        format!(
                            "start imdsd in that container (`docker compose up -d`) and read \
                             `docker logs {name}`; or run the doctor inside it"
                        ),
                    ),
                    None => {
                        // The daemon's own explanation: "… not an address of this host. Add it …".
                        let (what, fix) = match e.reason.split_once(". ") {
                            Some((what, fix)) => (what.to_string(), lowercase_first(fix)),
                            None => (
                                e.reason.clone(),
                                "choose another --listen address".to_string(),
                            ),
                        };
                        report.fail(LISTEN, format!("{addr}: {what}"), fix);
                    }
                }
                out.push(ListenAddr {
                    addr,
                    on_host: false,
                });
                continue;
            }
        };
        out.push(ListenAddr { addr, on_host });
        if addr.port() == 0 {
            report.pass(
                LISTEN,
                format!("{ip} is an address of this host (port 0: any free port)"),
            );
            continue;
        }
        match tokio::net::TcpListener::bind(addr).await {
            Ok(_) => report.pass(
                LISTEN,
                format!("{addr}: an address of this host, and the port is free"),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if answers_like_imds(addr).await {
                    report.pass(
                        LISTEN,
                        format!(
                            "{addr}: in use, and imdsd (or EC2) already answers there \
                             (Server: EC2ws); stop it before starting another daemon there"
                        ),
                    );
                } else {
                    report.fail(
                        LISTEN,
                        format!(
                            "{addr}: the port is in use by something that does not answer like \
                             imdsd"
                        ),
                        format!(
                            "stop it (`sudo ss -ltnp 'sport = :{}'` shows which process) or \
                             choose another --listen port",
                            addr.port()
                        ),
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => report.fail(
                LISTEN,
                format!(
                    "{addr}: permission denied; port {} needs root or the capability to bind \
                     low ports",
                    addr.port()
                ),
                "run imdsd as root, or `sudo setcap cap_net_bind_service=+ep $(command -v imdsd)`",
            ),
            Err(e) => report.fail(
                LISTEN,
                format!("{addr}: cannot listen: {e}"),
                "choose another --listen address",
            ),
        }
    }
    out
}

/// "Add it …" → "add it …", to follow "fix:".
fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// True when something at `addr` answers a metadata GET with EC2's `Server: EC2ws` header.
async fn answers_like_imds(addr: SocketAddr) -> bool {
    let target = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    };
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(target).await.ok()?;
        stream
            .write_all(
                b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n\
                  User-Agent: imdsd-doctor\r\nConnection: close\r\n\r\n",
            )
            .await
            .ok()?;
        // Only the head matters; stop reading once it is complete.
        let mut head = Vec::new();
        let mut chunk = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Some(head)
    };
    matches!(tokio::time::timeout(HTTP_TIMEOUT, ask).await, Ok(Some(head)) if is_ec2ws(&head))
}

/// True when an HTTP response head carries `Server: EC2ws`.
fn is_ec2ws(response: &[u8]) -> bool {
    let text = String::from_utf8_lossy(response);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.split("\r\n");
    lines
        .next()
        .is_some_and(|status| status.starts_with("HTTP/"))
        && lines.any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("server") && v.trim() == "EC2ws"
            })
        })
}

// ---------------------------------------------------------------------------------------------
// 6. network

fn check_network(report: &mut Report, listen: &[ListenAddr], docker: &DockerState) {
    for l in listen {
        let ip = l.addr.ip();
        if !is_metadata_network_address(ip) {
            report.skip(
                NETWORK,
                format!(
                    "{ip} is not a link-local address, so no metadata network layout applies \
                     (containers reach it only if they can route to it)"
                ),
            );
            continue;
        }
        match docker {
            DockerState::Disabled => report.skip(
                NETWORK,
                format!("{ip}: no Docker Engine configured, so there are no container networks"),
            ),
            DockerState::Unavailable => report.skip(
                NETWORK,
                format!("{ip}: the Docker Engine cannot be reached (see the docker check)"),
            ),
            DockerState::Ready(survey) => {
                let (status, detail, fix) = classify_network(ip, l.on_host, survey);
                report.add(Finding {
                    status,
                    check: NETWORK,
                    detail,
                    fix,
                });
            }
        }
    }
}

/// Addresses the metadata layouts use: IPv4 link-local (`169.254.169.254` on a
/// `169.254.169.0/24` network, or any other link-local network), and EC2's IPv6 `fd00:ec2::254`.
fn is_metadata_network_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[..2] == [0xfd00, 0x0ec2],
    }
}

/// Where `ip` sits among the Docker networks: host layout (a network's gateway), compose layout
/// (a container address), or nowhere.
fn classify_network(
    ip: IpAddr,
    on_host: bool,
    survey: &Survey,
) -> (Status, String, Option<String>) {
    let containing = survey.networks.iter().find_map(|n| {
        n.subnets
            .iter()
            .find(|(subnet, _)| subnet.contains(&ip))
            .map(|(subnet, gateway)| (n, subnet, gateway))
    });
    match containing {
        Some((n, subnet, Some(gateway))) if *gateway == ip => (
            Status::Pass,
            format!(
                "{ip} is the gateway of {} network {} ({subnet}): host layout; {} containers on \
                 {} reach imdsd directly",
                survey.engine,
                n.name,
                if on_host {
                    "the host has this address and"
                } else {
                    "the engine puts the address on the bridge with the network's first \
                     container (imdsd listens there ahead of it), and then"
                },
                n.name
            ),
            None,
        ),
        Some((n, subnet, _)) => {
            let holder = match survey.holders.get(&ip) {
                Some((name, _)) => format!("container {name} has it"),
                None => format!(
                    "no running container has it yet: imdsd's container must run on {} with \
                     `--ip {ip}`",
                    n.name
                ),
            };
            (
                Status::Pass,
                format!(
                    "{ip} is a container address in {} network {} ({subnet}): compose \
                     layout; {holder}",
                    survey.engine, n.name
                ),
                None,
            )
        }
        None if on_host => (
            Status::Pass,
            format!(
                "no Docker network contains {ip}, but it is an address of this host, so \
                 containers reach it through their default gateway (like the README's docker0 \
                 setup)"
            ),
            None,
        ),
        None => {
            let create = match ip {
                IpAddr::V4(v4) => {
                    let subnet = Ipv4Net::new(v4, 24)
                        .map_or_else(|_| format!("{v4}/24"), |n| n.trunc().to_string());
                    format!(
                        "`docker network create --subnet {subnet} --gateway {ip} ec2_metadata` \
                         (the host layout: the gateway is the host's address)"
                    )
                }
                IpAddr::V6(_) => format!(
                    "`docker network create --ipv6 --subnet fd00:ec2::/64 --gateway {ip} \
                     ec2_metadata`"
                ),
            };
            (
                Status::Fail,
                format!(
                    "no Docker network contains {ip}, and it is not an address of this host, so \
                     containers cannot reach imdsd there"
                ),
                Some(format!("`imdsd network up`, or {create}")),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. ec2-redirect

/// Files that say "this is an EC2 instance" without a network call.
const EC2_EVIDENCE: &[&str] = &[
    "/sys/devices/virtual/dmi/id/board_asset_tag",
    "/sys/hypervisor/uuid",
    "/sys/devices/virtual/dmi/id/sys_vendor",
];

async fn check_ec2_redirect(report: &mut Report, read: &dyn Fn(&str) -> Option<String>) {
    let Some(evidence) = ec2_evidence(read) else {
        report.skip(
            EC2_REDIRECT,
            "not on EC2 (no instance id in /sys/devices/virtual/dmi/id/board_asset_tag, no ec2 \
             in /sys/hypervisor/uuid)",
        );
        return;
    };
    let fix = "`sudo imdsd network up --layout ec2`";
    let mut command = tokio::process::Command::new("iptables-save");
    command
        .args(["-t", "nat"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(COMMAND_TIMEOUT, command.output()).await {
        Ok(Ok(out)) if out.status.success() => {
            match find_imdsd_rule(&String::from_utf8_lossy(&out.stdout)) {
                Some(rule) => report.pass(
                    EC2_REDIRECT,
                    format!("on EC2 ({evidence}); containers' metadata requests go to imdsd: {rule}"),
                ),
                None => report.fail(
                    EC2_REDIRECT,
                    format!(
                        "on EC2 ({evidence}), but no iptables nat rule with the comment imdsd \
                         redirects containers' metadata requests, so they reach the instance's \
                         own metadata service and its instance-profile role"
                    ),
                    fix,
                ),
            }
        }
        Ok(Ok(out)) => report.fail(
            EC2_REDIRECT,
            format!(
                "on EC2 ({evidence}), but `iptables-save -t nat` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            format!("run the doctor as root (reading the nat table needs it); if the rule is missing, {fix}"),
        ),
        Ok(Err(e)) => report.fail(
            EC2_REDIRECT,
            format!("on EC2 ({evidence}), but `iptables-save` cannot run: {e}"),
            format!("install iptables and run the doctor as root; if the rule is missing, {fix}"),
        ),
        Err(_) => report.fail(
            EC2_REDIRECT,
            format!(
                "on EC2 ({evidence}), but `iptables-save -t nat` did not finish within {} s",
                COMMAND_TIMEOUT.as_secs()
            ),
            "check that no other process holds the xtables lock, and run the doctor again",
        ),
    }
}

/// Why this looks like an EC2 instance, if it does. `read` reads a file (tests pass their own).
fn ec2_evidence(read: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let [asset_tag, hypervisor, vendor] = EC2_EVIDENCE else {
        return None;
    };
    if let Some(tag) = read(asset_tag).map(|s| s.trim().to_string())
        && tag.starts_with("i-")
    {
        return Some(format!("instance {tag}"));
    }
    if read(hypervisor).is_some_and(|s| s.trim().to_ascii_lowercase().starts_with("ec2")) {
        return Some(format!("{hypervisor} starts with ec2"));
    }
    if read(vendor).is_some_and(|s| s.trim() == "Amazon EC2") {
        return Some("DMI vendor Amazon EC2".into());
    }
    None
}

/// The first nat rule whose comment names imdsd, in `iptables-save` output.
fn find_imdsd_rule(save: &str) -> Option<String> {
    save.lines()
        .map(str::trim)
        .find(|l| {
            l.starts_with("-A ")
                && l.split_once("--comment").is_some_and(|(_, rest)| {
                    rest.trim_start()
                        .trim_start_matches('"')
                        .starts_with("imdsd")
                })
        })
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------------
// systemd-imdsd's prohibit route

/// The instance metadata addresses, IPv4 and IPv6 (Nitro).
const METADATA_ADDRESSES: [&str; 2] = ["169.254.169.254", "fd00:ec2::254"];
/// systemd-imdsd@.service's Varlink socket (systemd 261 and later).
const SYSTEMD_IMDSD_SOCKET: &str = "/run/systemd/io.systemd.InstanceMetadata";

/// systemd ≥ 261 ships systemd-imdsd, a metadata *client* (not this project). In its default
/// "locked" mode (`systemd.imds.network=locked` on the kernel command line) it adds a
/// "prohibit" route for the metadata address, so that regular processes reach IMDS only
/// through it. That matters to imdsd in proxy mode (imdsd itself must reach the real IMDS), and
/// not to imdsd listening on the metadata address: a local address is delivered through the
/// local routing table, which is looked up before the main table's routes.
async fn check_metadata_route(report: &mut Report, config: &Config) {
    let systemd_imdsd = std::path::Path::new(SYSTEMD_IMDSD_SOCKET).exists();
    let neighbour = if systemd_imdsd {
        format!("systemd-imdsd runs ({SYSTEMD_IMDSD_SOCKET})")
    } else {
        "no systemd-imdsd".to_string()
    };
    let mut blocks = Vec::new();
    for family in ["-4", "-6"] {
        for (what, args) in [
            ("route", vec![family, "route", "show", "table", "all"]),
            ("rule", vec![family, "rule", "show"]),
        ] {
            match ip_output(&args).await {
                Ok(text) => blocks.extend(
                    prohibitions(&text)
                        .into_iter()
                        .map(|l| format!("{what} `{l}`")),
                ),
                Err(e) => {
                    report.skip(METADATA_ROUTE, format!("cannot read the routes: {e}"));
                    return;
                }
            }
        }
    }
    if blocks.is_empty() {
        report.pass(
            METADATA_ROUTE,
            format!("no prohibit route or rule for the metadata address; {neighbour}"),
        );
        return;
    }
    let found = blocks.join(", ");
    let upstream_host = config.proxy.as_ref().and_then(|p| {
        let rest = p
            .upstream
            .split_once("://")
            .map_or(p.upstream.as_str(), |(_, r)| r);
        let host = rest.split('/').next().unwrap_or_default();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.split(']').next())
            .unwrap_or_else(|| host.rsplit_once(':').map_or(host, |(h, _)| h));
        host.parse::<IpAddr>().ok()
    });
    let mut failed = false;
    for address in METADATA_ADDRESSES {
        let Ok(ip) = address.parse::<IpAddr>() else {
            continue;
        };
        let route = route_to(ip).await;
        let serves_it = config.listen.iter().any(|l| l.ip() == ip);
        if upstream_host == Some(ip) && route == RouteTo::Prohibited {
            failed = true;
            report.fail(
                METADATA_ROUTE,
                format!(
                    "proxy mode forwards to the real metadata service at {ip}, but this host \
                     prohibits routing to it ({found}; {neighbour}): systemd-imdsd's \"locked\" \
                     mode keeps every process but systemd-imdsd away from IMDS"
                ),
                "boot with systemd.imds.network=unlocked on the kernel command line (systemd-imdsd \
                 keeps working, and IMDS is reachable directly again), or exempt imdsd in the \
                 network configuration: a routing rule ahead of the prohibit route that sends \
                 imdsd's own traffic to the metadata address (by its user, \
                 `ip rule add uidrange UID-UID to 169.254.169.254 lookup TABLE`) to a table with \
                 the instance's route",
            );
        } else if serves_it && route == RouteTo::Local {
            report.pass(
                METADATA_ROUTE,
                format!(
                    "{found} ({neighbour}), but imdsd listens on {ip}, an address of this host: \
                     it is delivered through the local table, before that route, so containers \
                     reach imdsd; only the real IMDS is out of reach for host processes"
                ),
            );
        }
    }
    if !failed
        && config.proxy.is_none()
        && !config.listen.iter().any(|l| {
            METADATA_ADDRESSES
                .iter()
                .any(|a| a.parse::<IpAddr>().ok() == Some(l.ip()))
        })
    {
        report.pass(
            METADATA_ROUTE,
            format!(
                "{found} ({neighbour}): imdsd neither forwards to the real IMDS nor listens on \
                 the metadata address, so the route does not stand in its way"
            ),
        );
    }
}

/// Runs `ip ARGS` and returns its output.
async fn ip_output(args: &[&str]) -> Result<String, String> {
    let mut command = tokio::process::Command::new("ip");
    command
        .args(args)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(COMMAND_TIMEOUT, command.output()).await {
        Ok(Ok(out)) if out.status.success() => {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Ok(Ok(out)) => Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("`ip` cannot run ({e}); install iproute2")),
        Err(_) => Err(format!("`ip {}` did not finish", args.join(" "))),
    }
}

/// The lines of `ip route show` or `ip rule show` that prohibit a metadata address.
fn prohibitions(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.contains(&"prohibit")
                && words.iter().any(|w| {
                    let w = w
                        .strip_suffix("/32")
                        .or_else(|| w.strip_suffix("/128"))
                        .unwrap_or(w);
                    METADATA_ADDRESSES.contains(&w)
                })
        })
        .map(str::to_string)
        .collect()
}

/// How this host routes a packet to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteTo {
    /// An address of this host (the local table).
    Local,
    /// A prohibit route or rule: the sender gets EACCES.
    Prohibited,
    /// Anything else (a gateway, an interface, or no route).
    Elsewhere,
}

async fn route_to(ip: IpAddr) -> RouteTo {
    let ip = ip.to_string();
    let mut command = tokio::process::Command::new("ip");
    command
        .args(["route", "get", &ip])
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(COMMAND_TIMEOUT, command.output()).await {
        Ok(Ok(out)) => route_kind(
            out.status.success(),
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        ),
        _ => RouteTo::Elsewhere,
    }
}

/// Reads `ip route get`'s answer: `local 169.254.169.254 dev lo table local …`, or a failure
/// with "Permission denied" (EACCES, what a prohibit route answers), or "prohibit …".
fn route_kind(ok: bool, stdout: &str, stderr: &str) -> RouteTo {
    let first = stdout.split_whitespace().next().unwrap_or_default();
    if ok && first == "local" {
        RouteTo::Local
    } else if first == "prohibit" || stderr.contains("Permission denied") {
        RouteTo::Prohibited
    } else {
        RouteTo::Elsewhere
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prohibit_route_or_rule_for_the_metadata_address_is_found() {
        let routes = "default via 192.0.2.1 dev eth0\nprohibit 169.254.169.254 \n\
                      169.254.169.0/24 dev imdsd0 proto kernel scope link src 169.254.169.254\n\
                      local 169.254.169.254 dev imdsd0 table local proto kernel scope host\n";
        assert_eq!(prohibitions(routes), ["prohibit 169.254.169.254"]);
        let v6 = "prohibit fd00:ec2::254 dev lo metric 1024 pref medium\n";
        assert_eq!(prohibitions(v6).len(), 1);
        let rules = "0:\tfrom all lookup local\n100:\tfrom all to 169.254.169.254 prohibit\n";
        assert_eq!(
            prohibitions(rules),
            ["100:\tfrom all to 169.254.169.254 prohibit"]
        );
        assert!(prohibitions("prohibit 10.0.0.0/8\n").is_empty());
        assert_eq!(
            route_kind(
                true,
                "local 169.254.169.254 dev lo table local src 169.254.169.254",
                ""
            ),
            RouteTo::Local
        );
        assert_eq!(
            route_kind(false, "", "RTNETLINK answers: Permission denied"),
            RouteTo::Prohibited
        );
        assert_eq!(
            route_kind(
                true,
                "169.254.169.254 via 192.0.2.1 dev eth0 src 192.0.2.2",
                ""
            ),
            RouteTo::Elsewhere
        );
    }

    fn survey() -> Survey {
        Survey {
            engine: "Docker",
            rootless: false,
            networks: vec![
                NetworkInfo {
                    name: "bridge".into(),
                    subnets: vec![(
                        "172.17.0.0/16".parse().expect("net"),
                        Some("172.17.0.1".parse().expect("ip")),
                    )],
                    bridge: Some("docker0".into()),
                },
                NetworkInfo {
                    name: "ec2_metadata".into(),
                    subnets: vec![(
                        "169.254.169.0/24".parse().expect("net"),
                        Some("169.254.169.1".parse().expect("ip")),
                    )],
                    bridge: Some("br-0123456789ab".into()),
                },
            ],
            served_networks: ["ec2_metadata".to_string()].into(),
            holders: [(
                "169.254.169.254".parse().expect("ip"),
                ("imdsd-1".to_string(), "ec2_metadata".to_string()),
            )]
            .into(),
            served: Vec::new(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_rootless_engine_is_told_by_its_security_options_or_its_socket() {
        let opts = |o: &[&str]| o.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
        // Podman 4.3 rootless: its own field; Docker rootless: a security option.
        assert!(rootless(
            &opts(&["name=seccomp,profile=default"]),
            true,
            "unix:///tmp/podman.sock"
        ));
        assert!(rootless(
            &opts(&["name=seccomp,profile=default", "name=rootless"]),
            false,
            "unix:///tmp/docker.sock"
        ));
        assert!(rootless(
            &opts(&[]),
            false,
            "unix:///run/user/1000/podman/podman.sock"
        ));
        assert!(!rootless(
            &opts(&["name=seccomp,profile=default", "name=cgroupns"]),
            false,
            "unix:///run/podman/podman.sock"
        ));
    }

    #[test]
    fn lines_have_the_documented_shape() {
        let mut r = Report::silent();
        r.pass(CONFIG, "valid");
        r.fail(LISTEN, "192.0.2.10:80: not here", "add it");
        r.skip(EC2_REDIRECT, "not on EC2");
        let lines: Vec<String> = r.findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "PASS config: valid",
                "FAIL listen: 192.0.2.10:80: not here — fix: add it",
                "SKIP ec2-redirect: not on EC2",
            ]
        );
        assert_eq!(r.finish(), 1);
        let mut ok = Report::silent();
        ok.pass(CONFIG, "valid");
        ok.skip(DOCKER, "none");
        assert_eq!(ok.finish(), 0, "a skip is not a failure");
    }

    #[test]
    fn the_server_header_identifies_imds() {
        assert!(is_ec2ws(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nServer: EC2ws\r\n\r\ni-0123"
        ));
        assert!(is_ec2ws(
            b"HTTP/1.1 401 Unauthorized\r\nserver:EC2ws\r\n\r\n"
        ));
        assert!(!is_ec2ws(
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\nServer: EC2ws"
        ));
        assert!(!is_ec2ws(b"SSH-2.0-OpenSSH_9.2\r\n"));
    }

    #[test]
    fn networks_tell_the_layouts_apart() {
        let s = survey();
        let (status, detail, _) = classify_network(ip("169.254.169.1"), true, &s);
        assert_eq!(status, Status::Pass);
        assert!(
            detail.contains("gateway of Docker network ec2_metadata"),
            "{detail}"
        );
        let (status, detail, _) = classify_network(ip("169.254.169.254"), false, &s);
        assert_eq!(status, Status::Pass);
        assert!(
            detail.contains("compose layout; container imdsd-1"),
            "{detail}"
        );
        let (status, detail, _) = classify_network(ip("169.254.169.9"), false, &s);
        assert_eq!(status, Status::Pass);
        assert!(detail.contains("--ip 169.254.169.9"), "{detail}");
        let (status, _, _) = classify_network(ip("169.254.7.7"), true, &s);
        assert_eq!(status, Status::Pass, "an address of the host is reachable");
        let (status, detail, fix) = classify_network(ip("169.254.7.254"), false, &s);
        assert_eq!(status, Status::Fail, "{detail}");
        let fix = fix.expect("a fix");
        assert!(fix.contains("imdsd network up"), "{fix}");
        assert!(
            fix.contains("--subnet 169.254.7.0/24 --gateway 169.254.7.254"),
            "{fix}"
        );
        assert!(is_metadata_network_address(ip("169.254.169.254")));
        assert!(is_metadata_network_address(ip("fd00:ec2::254")));
        assert!(!is_metadata_network_address(ip("127.0.0.1")));
        assert!(!is_metadata_network_address(ip("10.0.0.1")));
    }

    #[test]
    fn ec2_is_recognised_from_sysfs_alone() {
        let files = |pairs: &'static [(&'static str, &'static str)]| {
            move |path: &str| {
                pairs
                    .iter()
                    .find(|(p, _)| *p == path)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        assert_eq!(
            ec2_evidence(&files(&[(
                "/sys/devices/virtual/dmi/id/board_asset_tag",
                "i-0123456789abcdef0\n"
            )])),
            Some("instance i-0123456789abcdef0".into())
        );
        assert!(
            ec2_evidence(&files(&[(
                "/sys/hypervisor/uuid",
                "ec2e1916-9099-7caf-fd21-012345abcdef\n"
            )]))
            .is_some()
        );
        assert!(
            ec2_evidence(&files(&[(
                "/sys/devices/virtual/dmi/id/board_asset_tag",
                "Not Specified\n"
            )]))
            .is_none()
        );
        assert!(ec2_evidence(&files(&[])).is_none());
    }

    #[test]
    fn the_redirect_rule_is_found_by_its_comment() {
        let save = "\
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -d 169.254.169.254/32 -i docker0 -p tcp -m tcp --dport 80 -m comment --comment imdsd -j DNAT --to-destination 172.17.0.1:8169
COMMIT
";
        assert!(
            find_imdsd_rule(save)
                .expect("found")
                .contains("--to-destination 172.17.0.1:8169")
        );
        let quoted = "-A PREROUTING -m comment --comment \"imdsd: metadata\" -j DNAT";
        assert!(find_imdsd_rule(quoted).is_some());
        assert!(find_imdsd_rule("-A PREROUTING -m comment --comment other -j DNAT").is_none());
        assert!(find_imdsd_rule("# imdsd\n").is_none());
    }

    #[test]
    fn identity_messages_split_into_problem_and_fix() {
        let (what, fix) =
            split_fix("no usable AWS identity (x). Tried: a; b. Fix: run `aws configure`");
        assert_eq!(what, "no usable AWS identity (x). Tried: a; b");
        assert_eq!(fix, "run `aws configure`");
        let (what, fix) = split_fix("STS refused");
        assert_eq!(what, "STS refused");
        assert!(fix.contains("get-caller-identity"));
    }

    #[test]
    fn a_bad_configuration_is_one_failure_per_problem() {
        let mut r = Report::silent();
        let env = |_: &str| None;
        let args: Vec<String> = ["--http-tokens", "maybe", "--refresh-threshold", "1"]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(matches!(
            check_config(&mut r, &args, &env),
            ConfigOutcome::Invalid
        ));
        assert_eq!(r.count(Status::Fail), 2);
        assert!(r.findings.iter().all(|f| f.check == CONFIG));
    }
}
