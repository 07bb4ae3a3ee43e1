//! Builds the running daemon from a validated [`Config`]: state, credential source, broker,
//! identity, the metadata tree, and the listeners. Then serves until told to stop, and drains.
//!
//! Startup fails fast and says why: a problem the operator must fix in the configuration is a
//! [`StartError::Config`] (exit 64), anything else a [`StartError::Runtime`] (exit 1).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, ConfigError, SourceConfig};
use crate::credentials::CredentialSource;
use crate::credentials::broker::{Broker, Lease};
use crate::credentials::fake::FakeSource;
use crate::credentials::observed::ObservedSource;
use crate::credentials::sts::{StsSetupError, StsSource};
use crate::docker::{DockerStats, Watcher};
use crate::ecs::{AuthTokens, Ecs};
use crate::identity::role::AccountContext;
use crate::identity::{ConnectionCaller, Identity};
use crate::imds::Imds;
use crate::imds::token::Tokens;
use crate::imds::tree::Tree;
use crate::index::Index;
use crate::metrics::Metrics;
use crate::server::{self, ServerOptions};
use crate::state::StateDir;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The operator must change the configuration or the host (exit 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Something failed that is not the configuration's fault (exit 1).
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
}

impl StartError {
    fn config(problem: impl Into<String>) -> Self {
        StartError::Config(ConfigError {
            problems: vec![problem.into()],
        })
    }
}

/// The assembled daemon, bound and ready to serve.
pub struct App {
    imds: Arc<Imds>,
    broker: Broker,
    listeners: Vec<TcpListener>,
    local_addrs: Vec<SocketAddr>,
    server: ServerOptions,
    identity: Arc<Identity>,
    /// Follows the Docker Engine, when there is one.
    watcher: Option<Watcher>,
    index: Option<Index>,
    docker_stats: Option<Arc<DockerStats>>,
    metrics: Arc<Metrics>,
    admin: Arc<Admin>,
    admin_listener: Option<TcpListener>,
    admin_addr: Option<SocketAddr>,
    ecs: Arc<Ecs>,
    ecs_listeners: Vec<TcpListener>,
    /// Keeps the credentials of callers known in advance cached and refreshed.
    _leases: Vec<Lease>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("listening", &self.local_addrs)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Builds everything and binds the listeners. Must run inside a tokio runtime.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let clock: SharedClock = Arc::new(SystemClock);
        let env = |k: &str| std::env::var(k).ok();

        let state = StateDir::open(config.state_dir.as_deref(), &env)
            .map_err(|e| StartError::config(e.0))?;
        let key = state.token_key().map_err(|e| StartError::config(e.0))?;
        match state.path() {
            Some(dir) => tracing::debug!(state_dir = %dir.display(), "using state directory"),
            None => tracing::warn!(
                "no writable state directory (tried $STATE_DIRECTORY, /var/lib/imdsd, ~/.local/state/imdsd): \
                 IMDSv2 tokens will not survive a restart; set --state-dir"
            ),
        }

        let (source, accounts) = build_source(&config, clock.clone()).await?;
        let mut identity = Identity::new(config.identity.clone(), accounts)
            .map_err(|problems| ConfigError { problems })?;
        let watcher = config.docker.clone().map(|options| {
            let (index, writer) = crate::index::index();
            identity.attach_index(index);
            Watcher::new(options, writer)
        });
        let index = watcher.as_ref().map(Watcher::index);
        let docker_stats = watcher.as_ref().map(Watcher::stats);
        let identity = Arc::new(identity);
        let metrics = Arc::new(Metrics::default());
        let observed = ObservedSource::new(source, metrics.clone());
        let source_health = observed.health();
        let broker = Broker::new(Arc::new(observed), clock.clone(), config.broker.clone());
        let leases: Vec<Lease> = identity
            .known_requests()
            .iter()
            .map(|r| broker.retain(r))
            .collect();

        let ecs_tokens = AuthTokens::new(key.as_bytes());
        let mut imds = Imds::new(
            Tree::build(&config.instance),
            Tokens::new(key),
            identity.clone(),
            broker.clone(),
            config.imds.clone(),
            clock,
            metrics.clone(),
        );
        if let Some(proxy) = &config.proxy {
            let upstream =
                crate::proxy::Upstream::new(proxy.clone()).map_err(StartError::config)?;
            tracing::info!(upstream = %proxy.upstream, deny_by_default = proxy.allow.is_some(), hide_user_data = proxy.hide_user_data, "proxy mode: forwarding what imdsd does not own");
            imds = imds.with_upstream(Arc::new(upstream));
        }
        let imds = Arc::new(imds);
        match &config.docker {
            Some(d) => {
                tracing::info!(docker = %d.host, networks = %d.networks.describe(), "telling containers apart through the Docker Engine")
            }
            None => tracing::warn!(
                "no Docker Engine (--docker-host none, or no /var/run/docker.sock): every caller is served by the mapping file and the default role"
            ),
        }

        let ahead = gateways_to_bind_ahead(&config).await;
        let listeners = server::bind_all_ahead(&config.listen, &ahead)
            .await
            .map_err(|e| {
                if e.is_configuration {
                    StartError::config(e.to_string())
                } else {
                    StartError::Runtime(anyhow::Error::new(e))
                }
            })?;
        let local_addrs = listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect::<Vec<_>>();
        let admin_listener = match config.admin_listen {
            Some(addr) => Some(
                server::bind_all(&[addr])
                    .await
                    .map_err(|e| {
                        StartError::config(format!(
                            "--admin-listen: {e} (set --admin-listen to another address, or none)"
                        ))
                    })?
                    .remove(0),
            ),
            None => None,
        };
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let ecs_listeners = server::bind_all_ahead(&config.ecs_listen, &ahead)
            .await
            .map_err(|e| {
                if e.is_configuration {
                    StartError::config(format!("--ecs-listen: {e}"))
                } else {
                    StartError::Runtime(anyhow::Error::new(e))
                }
            })?;
        let ecs = Arc::new(Ecs {
            identity: identity.clone(),
            broker: broker.clone(),
            auth: config.ecs_auth.then(|| ecs_tokens.clone()),
            access_log_limits: config.imds.access_log_limits.clone(),
        });
        let admin = Arc::new(Admin {
            registry: crate::metrics::registry(
                metrics.clone(),
                broker.clone(),
                index.clone(),
                docker_stats.clone(),
            ),
            broker: broker.clone(),
            identity: identity.clone(),
            index: index.clone(),
            source: source_health,
            container_tokens: ecs_tokens,
        });

        tracing::info!(
            source = broker.source_kind(),
            default_role = identity.default_role().map(|a| a.as_str()),
            http_tokens = ?config.imds.http_tokens,
            instance_id = %config.instance.instance_id,
            region = %config.instance.region,
            "imdsd {} ready",
            env!("CARGO_PKG_VERSION")
        );
        Ok(App {
            imds,
            broker,
            listeners,
            local_addrs,
            server: config.server,
            identity,
            watcher,
            index,
            docker_stats,
            metrics,
            admin,
            admin_listener,
            admin_addr,
            ecs,
            ecs_listeners,
            _leases: leases,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn imds(&self) -> &Arc<Imds> {
        &self.imds
    }

    /// The container index, when following a Docker Engine.
    pub fn index(&self) -> Option<&Index> {
        self.index.as_ref()
    }

    /// Where the admin API listens, if it does.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Where the container-credentials endpoint listens.
    pub fn ecs_addrs(&self) -> Vec<SocketAddr> {
        self.ecs_listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn admin(&self) -> &Arc<Admin> {
        &self.admin
    }

    /// The Docker watcher's counters (API calls, events, reconnects).
    pub fn docker_stats(&self) -> Option<&Arc<DockerStats>> {
        self.docker_stats.as_ref()
    }

    /// Serves until `shutdown` is cancelled, then drains requests in flight.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut background = tokio::task::JoinSet::new();
        if let (Some(watcher), Some(index)) = (self.watcher, self.index) {
            background.spawn(watcher.run(shutdown.clone()));
            background.spawn(crate::prefetch::run(
                index,
                self.identity.clone(),
                self.broker.clone(),
                shutdown.clone(),
            ));
        }
        let mut tasks = tokio::task::JoinSet::new();
        if let (Some(listener), Some(addr)) = (self.admin_listener, self.admin_addr) {
            tracing::info!(addr = %addr, "serving admin API");
            let admin = self.admin.clone();
            let handler = Arc::new(move |_caller| {
                let admin = admin.clone();
                move |req| {
                    let admin = admin.clone();
                    async move { admin.handle(req).await }
                }
            });
            tasks.spawn(server::serve(
                listener,
                handler,
                self.server.clone(),
                shutdown.clone(),
            ));
        }
        for listener in self.ecs_listeners {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(addr = %addr, "serving container credentials");
            }
            let ecs = self.ecs.clone();
            let handler = Arc::new(move |caller| {
                let ecs = ecs.clone();
                move |req| {
                    let ecs = ecs.clone();
                    async move { ecs.handle(req, caller).await }
                }
            });
            tasks.spawn(server::serve(
                listener,
                handler,
                self.server.clone(),
                shutdown.clone(),
            ));
        }
        for (listener, addr) in self.listeners.into_iter().zip(self.local_addrs.iter()) {
            tracing::info!(addr = %addr, "serving instance metadata");
            let imds = self.imds.clone();
            let handler = Arc::new(move |caller| {
                let imds = imds.clone();
                // Who the caller is, kept for the connection's next request.
                let known = ConnectionCaller::default();
                move |req| imds.clone().handle(req, caller, &known)
            });
            tasks.spawn(server::serve(
                listener,
                handler,
                self.server.clone(),
                shutdown.clone(),
            ));
        }
        while tasks.join_next().await.is_some() {}
        shutdown.cancel();
        while background.join_next().await.is_some() {}
        tracing::info!("stopped");
    }
}

async fn build_source(
    config: &Config,
    clock: SharedClock,
) -> Result<(Arc<dyn CredentialSource>, AccountContext), StartError> {
    match &config.source {
        SourceConfig::Fake { lifetime } => {
            // Offline, the daemon's own identity is the emulated instance's account.
            let accounts =
                config.account_context(&config.instance.account_id, config.instance.partition);
            Ok((Arc::new(FakeSource::new(*lifetime, clock)), accounts))
        }
        SourceConfig::Sts { .. } => {
            let Some(options) = config.sts_options() else {
                return Err(StartError::Runtime(anyhow::anyhow!(
                    "an STS source without STS options"
                )));
            };
            // STS may be briefly unreachable while a host boots; an identity problem is final.
            let mut attempt = 0;
            let source = loop {
                attempt += 1;
                match StsSource::connect(&options).await {
                    Ok(source) => break source,
                    Err(StsSetupError::Identity(message)) => {
                        return Err(StartError::config(message));
                    }
                    Err(StsSetupError::Unreachable(message)) if attempt >= 3 => {
                        return Err(StartError::Runtime(anyhow::anyhow!(message)));
                    }
                    Err(StsSetupError::Unreachable(message)) => {
                        tracing::warn!(attempt, error = %message, "STS unreachable; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(attempt)).await;
                    }
                }
            };
            let identity = source.identity();
            let accounts = config.account_context(&identity.account, &identity.partition);
            Ok((Arc::new(source), accounts))
        }
    }
}

/// Listen addresses that are not on this host yet but are the gateway of one of the engine's
/// networks: Podman (netavark) puts a network's gateway on its bridge only while a container is
/// attached, so in the host layout imdsd binds it ahead and answers once it appears. Any other
/// missing address stays an error that says how to add it.
async fn gateways_to_bind_ahead(config: &Config) -> Vec<std::net::IpAddr> {
    let Some(docker) = &config.docker else {
        return Vec::new();
    };
    let local: Vec<std::net::IpAddr> = crate::docker::local_addresses()
        .into_iter()
        .map(|(_, ip)| ip)
        .collect();
    let missing: Vec<std::net::IpAddr> = config
        .listen
        .iter()
        .chain(&config.ecs_listen)
        .map(SocketAddr::ip)
        .filter(|ip| !ip.is_unspecified() && !local.contains(ip))
        .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    let gateways = match crate::docker::network_gateways(docker).await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list the engine's networks before binding");
            return Vec::new();
        }
    };
    missing
        .into_iter()
        .filter(|ip| {
            let network = gateways.iter().find(|(_, g)| g == ip).map(|(n, _)| n);
            if let Some(network) = network {
                tracing::info!(address = %ip, network = %network, "listening ahead on the gateway of a network whose bridge is not up yet (Podman brings it up with the first container)");
            }
            network.is_some()
        })
        .collect()
}
