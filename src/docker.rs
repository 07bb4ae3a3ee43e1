//! The Docker Engine watcher: mirrors running containers into the [`crate::index`] and keeps it
//! current. The only module that uses `bollard`.
//!
//! Each session with the engine:
//! 1. reads the engine's clock (`/info`), so that no event can fall between the listing and the
//!    subscription: events are requested `since` that moment and replayed by the engine;
//! 2. lists the networks (their subnets tell container callers from the host) and the running
//!    containers, inspects the ones the index does not already know, and swaps the result in;
//! 3. applies events: a container that dies or is destroyed is removed at once, without a round
//!    trip; a start, rename, update, or network (dis)connect is re-inspected; a periodic resync
//!    repairs anything missed. A container whose record cannot be read (Podman's `stopped`, a
//!    state Docker's API does not have) is not served; it does not end the session.
//!
//! When the engine goes away the session ends and the index stops being authoritative: while the
//! watcher cannot see events, a container may die and another take its address, so callers get a
//! retryable 503 rather than a possibly stale role. The watcher reconnects with a short backoff and
//! a full sync makes the index authoritative again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{
    EventsOptions, InspectNetworkOptions, ListContainersOptions, ListNetworksOptions,
};
use futures::StreamExt as _;
use futures::future::BoxFuture;
use ipnet::IpNet;
use tokio_util::sync::CancellationToken;

use crate::index::{Change, Container, Index, IndexWriter, Subnet};
use crate::liveness::{Monitor, Pidfd};

pub mod synthetic;

/// How to reach the engine and what to keep.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// `unix:///var/run/docker.sock`, `tcp://host:2375` or `http://host:2375`.
    pub host: String,
    /// Full resync interval.
    pub resync_every: Duration,
    /// Environment variables copied from containers into the index (the rest are not kept).
    pub env_keys: Vec<String>,
    /// Labels copied from containers into the index (the rest are not kept).
    pub label_keys: Vec<String>,
    /// Whose containers are served.
    pub networks: NetworkScope,
}

/// Which Docker networks' containers are served. A container calling from any other network is
/// refused: being able to reach imdsd's address (through the host's routing, from the default
/// `bridge` say) is not the same as being attached to the metadata network on purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkScope {
    /// The networks that carry one of these addresses, imdsd's own listen addresses: inside the
    /// network's subnet (the network's gateway in host mode, imdsd's container in compose), or on
    /// the network's bridge interface on this host (an address added to `docker0`). An
    /// unspecified address (`0.0.0.0`, `::`) stands for every address of this host.
    Carrying(Vec<IpAddr>),
    /// These networks, by name (`--networks a,b`).
    Named(Vec<String>),
    /// Every network (`--networks '*'`).
    All,
}

impl NetworkScope {
    /// For the start-up log and doctor.
    pub fn describe(&self) -> String {
        match self {
            NetworkScope::Carrying(addrs) => format!(
                "the networks that carry a listen address ({})",
                addrs
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            NetworkScope::Named(names) => names.join(", "),
            NetworkScope::All => "every network".into(),
        }
    }
}

/// What the scope is decided on, of one Docker network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    pub name: String,
    /// Each subnet with its gateway (the host's own address on it).
    pub subnets: Vec<(IpNet, Option<IpAddr>)>,
    /// The host interface of a bridge network (`docker0`, `br-<id>`, `imdsd0`), if it is one.
    pub bridge: Option<String>,
}

impl NetworkInfo {
    /// Reads what matters of a network listing entry; `None` for an entry without a name.
    pub fn from_model(n: &bollard::models::Network) -> Option<Self> {
        let name = n.name.clone()?;
        let subnets = n
            .ipam
            .as_ref()
            .and_then(|i| i.config.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|cfg| {
                let subnet = cfg.subnet.as_deref()?.parse::<IpNet>().ok()?;
                let gateway = cfg
                    .gateway
                    .as_deref()
                    .and_then(|g| g.split('/').next())
                    .and_then(|g| g.parse::<IpAddr>().ok())
                    // Docker gives a subnet without an explicit gateway (typically an IPv6 one)
                    // its first address, on the host's bridge: that caller is the host.
                    .or_else(|| first_host(subnet));
                Some((subnet, gateway))
            })
            .collect();
        let option = n
            .options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.bridge.name"))
            .filter(|b| !b.is_empty())
            .cloned();
        let bridge = match (option, n.driver.as_deref(), n.id.as_deref()) {
            (Some(b), _, _) => Some(b),
            // Docker names a bridge it was not told a name for after the network's id.
            (None, Some("bridge"), Some(id)) if id.len() >= 12 => Some(format!("br-{}", &id[..12])),
            _ => None,
        };
        Some(NetworkInfo {
            name,
            subnets,
            bridge,
        })
    }
}

/// The networks `scope` serves among `networks`, given the addresses of this host's interfaces
/// (interface name, address).
pub fn served_networks(
    scope: &NetworkScope,
    networks: &[NetworkInfo],
    local: &[(String, IpAddr)],
) -> BTreeSet<String> {
    let carried = |n: &NetworkInfo, addrs: &[IpAddr]| {
        addrs.iter().any(|a| {
            let a = a.to_canonical();
            n.subnets.iter().any(|(net, _)| net.contains(&a))
                || n.bridge.as_ref().is_some_and(|bridge| {
                    local
                        .iter()
                        .any(|(iface, addr)| iface == bridge && addr.to_canonical() == a)
                })
        })
    };
    networks
        .iter()
        .filter(|n| match scope {
            NetworkScope::All => true,
            NetworkScope::Named(names) => names.contains(&n.name),
            NetworkScope::Carrying(addrs) => {
                if addrs.iter().any(IpAddr::is_unspecified) {
                    // Listening everywhere: every address of this host is a listen address.
                    let all: Vec<IpAddr> = local.iter().map(|(_, a)| *a).collect();
                    carried(n, &all)
                } else {
                    carried(n, addrs)
                }
            }
        })
        .map(|n| n.name.clone())
        .collect()
}

/// This host's interface addresses (name, address): in compose, imdsd's own container's.
pub fn local_addresses() -> Vec<(String, IpAddr)> {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|ifa| {
                let a = ifa.address?;
                let ip = if let Some(v4) = a.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else {
                    IpAddr::V6(a.as_sockaddr_in6()?.ip())
                };
                Some((ifa.interface_name, ip))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this host's interface addresses");
            Vec::new()
        }
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct DockerStats {
    /// Every call made to the engine.
    pub api_calls: AtomicU64,
    pub inspects: AtomicU64,
    pub lists: AtomicU64,
    pub events_applied: AtomicU64,
    /// Sessions that ended with an error (the engine went away, the stream broke).
    pub reconnects: AtomicU64,
    pub connected: AtomicBool,
    /// Container incarnations whose init process is watched (see [`crate::liveness`]).
    pub processes_watched: AtomicU64,
    /// Exits of watched init processes, marked before the engine's events said so, or after.
    pub exits_seen: Arc<AtomicU64>,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Docker(#[from] bollard::errors::Error),
    #[error("the event stream ended")]
    StreamEnded,
    #[error("{0}")]
    Config(String),
}

/// The bridge through which a Swarm task reaches its host.
pub const GATEWAY_BRIDGE: &str = "docker_gwbridge";
/// The label that names a Swarm task's service.
const SERVICE_ID_LABEL: &str = "com.docker.swarm.service.id";
/// Asks from the index (callers it could not place) are answered at most this often: each
/// answer lists the engine's containers, and a caller must not be able to make imdsd flood it.
const ASK_INTERVAL: Duration = Duration::from_millis(50);

const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Mirrors the engine into an index until shut down.
pub struct Watcher {
    options: DockerOptions,
    writer: IndexWriter,
    stats: Arc<DockerStats>,
    /// The networks served now, by name: worked out from [`DockerOptions::networks`] whenever the
    /// networks are listed.
    served: BTreeSet<String>,
    /// Watches the indexed containers' init processes (see [`crate::liveness`]); started with
    /// the watcher.
    monitor: Option<Monitor>,
}

impl Watcher {
    pub fn new(options: DockerOptions, writer: IndexWriter) -> Self {
        Self {
            options,
            writer,
            stats: Arc::new(DockerStats::default()),
            served: BTreeSet::new(),
            monitor: None,
        }
    }

    pub fn stats(&self) -> Arc<DockerStats> {
        self.stats.clone()
    }

    pub fn index(&self) -> Index {
        self.writer.reader()
    }

    /// Runs sessions until `shutdown`, reconnecting with backoff (0.25 s doubling to 5 s, reset
    /// after a session that got as far as a full sync). The cap is low because callers are not
    /// served from the index while it is disconnected.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // `--docker-host synthetic:N` (benchmarks): made-up containers, no engine to follow.
        if let Some(Ok(n)) = synthetic::count(&self.options.host) {
            return synthetic::run(n, &self.options, &mut self.writer, &self.stats, shutdown).await;
        }
        self.monitor = Some(Monitor::spawn(
            self.writer.reader(),
            self.stats.exits_seen.clone(),
        ));
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let synced = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.session() => outcome,
            };
            let was_connected = self.stats.connected.swap(false, Ordering::AcqRel);
            self.writer.set_unready();
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            if let Err((e, reached_sync)) = synced {
                if reached_sync {
                    backoff = INITIAL_BACKOFF;
                }
                if was_connected || backoff == INITIAL_BACKOFF {
                    tracing::warn!(
                        docker = %self.options.host,
                        error = %e,
                        retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        "cannot follow the Docker Engine; container callers get 503 until it is back"
                    );
                } else {
                    tracing::debug!(docker = %self.options.host, error = %e, "still cannot reach the Docker Engine");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: sync, then follow events. Returns the error and whether a sync happened.
    async fn session(&mut self) -> Result<(), (SessionError, bool)> {
        let docker = self.connect().await.map_err(|e| (e, false))?;
        self.count(1);
        let since = docker
            .info()
            .await
            .ok()
            .and_then(|info| info.system_time)
            .and_then(|t| humantime::parse_rfc3339_weak(t.get(..19).unwrap_or(&t)).ok())
            .map(crate::clock::unix_seconds)
            // The engine's clock is the one that matters, but without it ours is close enough.
            .unwrap_or_else(|| crate::clock::unix_seconds(std::time::SystemTime::now()))
            .saturating_sub(2)
            .to_string();

        // By type only, never by action: engines name actions differently (Podman says `died`
        // and `remove` where Docker says `die` and `destroy`, and a Docker-style action filter
        // makes Podman 4 send neither), and an action imdsd was not told about must reach it to
        // be put in doubt rather than be silently missed.
        let filters: HashMap<String, Vec<String>> = [(
            "type".to_string(),
            vec!["container".into(), "network".into()],
        )]
        .into();
        let mut events = docker.events(Some(EventsOptions {
            since: Some(since),
            until: None,
            filters: Some(filters),
        }));
        self.count(1);

        let mut work = Work::default();
        self.full_sync(&docker, false)
            .await
            .map_err(|e| (e, false))?;
        work.synced(&self.writer.reader());
        self.stats.connected.store(true, Ordering::Release);
        self.writer.set_ready();
        tracing::info!(
            docker = %self.options.host,
            containers = self.writer.reader().len(),
            "following the Docker Engine"
        );

        let mut resync = tokio::time::interval(self.options.resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        // Asks from the index are answered at most once per ASK_INTERVAL: `look_at` is when the
        // pending ones will be.
        let mut look_at: Option<tokio::time::Instant> = None;
        let mut last_look = tokio::time::Instant::now() - ASK_INTERVAL;
        loop {
            work.start_queued(&docker, self);
            tokio::select! {
                // Events first: a removal is applied the moment it is read, never behind an
                // inspect (a dead container's address must be released before anything else).
                biased;
                event = events.next() => match event {
                    Some(Ok(event)) => {
                        self.stats.events_applied.fetch_add(1, Ordering::Relaxed);
                        self.apply_event(&docker, event, &mut work).await.map_err(|e| (e, true))?;
                    }
                    Some(Err(e)) => return Err((e.into(), true)),
                    None => return Err((SessionError::StreamEnded, true)),
                },
                Some(done) = work.inflight.next() => {
                    self.finish(done, &mut work).map_err(|e| (e, true))?;
                }
                _ = resync.tick() => {
                    self.full_sync(&docker, true).await.map_err(|e| (e, true))?;
                    work.synced(&self.writer.reader());
                }
                () = self.writer.asked(), if look_at.is_none() => {
                    look_at = Some(last_look + ASK_INTERVAL);
                }
                () = tokio::time::sleep_until(look_at.unwrap_or(last_look)), if look_at.is_some() => {
                    look_at = None;
                    last_look = tokio::time::Instant::now();
                    let asked = self.writer.take_asks();
                    if !asked.is_empty() {
                        work.look(&docker, self, asked);
                    }
                }
            }
        }
    }

    async fn connect(&self) -> Result<Docker, SessionError> {
        connect(&self.options.host).await
    }

    fn count(&self, calls: u64) {
        self.stats.api_calls.fetch_add(calls, Ordering::Relaxed);
    }

    /// Lists networks and containers and replaces the index. With `reuse`, containers already
    /// indexed with the same addresses are not inspected again (a periodic resync while events
    /// flowed); after a (re)connect everything is inspected, since a container may have restarted
    /// unseen and a new incarnation must get a new binding.
    async fn full_sync(&mut self, docker: &Docker, reuse: bool) -> Result<(), SessionError> {
        // A change of the served networks drops what was kept: containers are filtered anew.
        let reuse = !self.refresh_networks(docker).await? && reuse;
        let running = list_running(docker, &self.stats).await?;
        let gateway = gateway_endpoints(docker, &self.served, &self.stats).await?;
        let index = self.writer.reader();
        let mut containers = Vec::with_capacity(running.len());
        let mut inspected = Vec::new();
        for summary in running {
            let Some(id) = summary.id else { continue };
            let listed: HashSet<IpAddr> = summary
                .network_settings
                .and_then(|n| n.networks)
                .unwrap_or_default()
                .iter()
                .filter(|(name, _)| self.serves_network(name))
                .flat_map(|(_, endpoint)| endpoint_addresses(endpoint))
                .chain(gateway.get(&id).into_iter().flatten().copied())
                .collect();
            if reuse
                && let Some(known) = index.get(&id)
                && known.addresses.iter().copied().collect::<HashSet<_>>() == listed
                && !known.addresses.iter().any(|a| index.in_doubt(*a))
            {
                containers.push((*known).clone());
                continue;
            }
            if let Some(found) = fetch_details(docker, &id, &self.stats).await? {
                inspected.push(found);
            }
        }
        let mut processes = Vec::new();
        if !inspected.is_empty() {
            // Read again after the records (see `fetch_record`).
            let gateway = gateway_endpoints(docker, &self.served, &self.stats).await?;
            for (details, pidfd) in inspected {
                if let Some(c) = to_container(details, &self.options, &self.served, &gateway) {
                    if let Some(pidfd) = pidfd {
                        processes.push((c.clone(), pidfd));
                    }
                    containers.push(c);
                }
            }
        }
        // A full listing leaves nothing in doubt.
        let _ = self.writer.apply(Change::Replace(containers));
        for (c, pidfd) in processes {
            self.watch(&c, pidfd);
        }
        Ok(())
    }

    /// Has the monitor watch the init process of `c`, just indexed, unless it already does.
    fn watch(&self, c: &Container, pidfd: Pidfd) {
        if let Some(monitor) = &self.monitor
            && let Some(liveness) = self.writer.liveness_to_watch(c)
        {
            self.stats.processes_watched.fetch_add(1, Ordering::Relaxed);
            monitor.watch(pidfd, liveness, c.addresses.clone());
        }
    }

    fn serves_network(&self, name: &str) -> bool {
        self.served.contains(name)
    }

    fn to_container(&self, record: Record) -> Option<(Container, Option<Pidfd>)> {
        to_container(record.details, &self.options, &self.served, &record.gateway)
            .map(|c| (c, record.pidfd))
    }

    /// Lists the networks: their subnets tell container callers from the host, and the scope
    /// says which of them are served. Returns whether the served set changed (the containers
    /// then have to be listed again, to be kept or dropped by the new set).
    async fn refresh_networks(&mut self, docker: &Docker) -> Result<bool, SessionError> {
        self.count(1);
        let listed = docker.list_networks(None::<ListNetworksOptions>).await?;
        let networks: Vec<NetworkInfo> =
            listed.iter().filter_map(NetworkInfo::from_model).collect();
        let local = match self.options.networks {
            NetworkScope::Carrying(_) => local_addresses(),
            _ => Vec::new(),
        };
        let served = served_networks(&self.options.networks, &networks, &local);
        let subnets = networks
            .iter()
            .flat_map(|n| {
                let served = served.contains(&n.name);
                let network: Arc<str> = n.name.as_str().into();
                n.subnets.iter().map(move |(net, gateway)| Subnet {
                    network: network.clone(),
                    net: *net,
                    gateway: *gateway,
                    served,
                })
            })
            .collect();
        self.writer.set_networks(subnets);
        if served == self.served {
            return Ok(false);
        }
        if served.is_empty() {
            tracing::warn!(
                docker = %self.options.host,
                scope = %self.options.networks.describe(),
                "no Docker network is served, so no container gets a role: listen on the metadata \
                 network's address (imdsd network up), or name the networks with --networks"
            );
        } else {
            tracing::info!(
                docker = %self.options.host,
                networks = %served.iter().map(String::as_str).collect::<Vec<_>>().join(", "),
                "serving containers on these Docker networks; containers calling from any other are refused"
            );
        }
        self.served = served;
        Ok(true)
    }

    /// Applies one event: removals at once, everything else by asking the engine (in `work`).
    async fn apply_event(
        &mut self,
        docker: &Docker,
        event: EventMessage,
        work: &mut Work,
    ) -> Result<(), SessionError> {
        let action = event.action.as_deref().unwrap_or_default();
        let actor = event.actor.as_ref();
        let attributes = actor.and_then(|a| a.attributes.as_ref());
        match event.typ {
            Some(EventMessageTypeEnum::CONTAINER) => {
                let Some(id) = actor.and_then(|a| a.id.clone()).filter(|id| !id.is_empty()) else {
                    // About some container, but which? Everything is in doubt until listed anew.
                    tracing::warn!(
                        action,
                        "a container event without a container id: listing everything again"
                    );
                    return self.relist(docker, work).await;
                };
                match container_effect(action) {
                    // Removal needs no round trip: the sooner a dead container's addresses are
                    // released, the smaller the window in which a new one could be mistaken for it.
                    Effect::Remove => {
                        work.removed(&id);
                        self.apply(Change::Remove { id }, work);
                    }
                    Effect::Reinspect => work.inspect(id),
                    Effect::Ignore => {}
                    Effect::Unknown => {
                        tracing::info!(action, container = %short(&id), "an event imdsd does not know: asking the engine about the container again");
                        self.apply(Change::Doubt { id: id.clone() }, work);
                        work.inspect(id);
                    }
                }
            }
            Some(EventMessageTypeEnum::NETWORK) => match action {
                "connect" | "disconnect" => {
                    // Docker names the container in an attribute (the actor is the network, and
                    // `name` is the network's name); Podman makes the container the actor and
                    // names no network.
                    let docker_style = attributes.and_then(|a| a.get("container"));
                    let network = docker_style.and(attributes.and_then(|a| a.get("name")));
                    let id = docker_style
                        .or_else(|| actor.and_then(|a| a.id.as_ref()))
                        .cloned();
                    let Some(id) = id else {
                        return self.relist(docker, work).await;
                    };
                    // A network imdsd does not serve changes nothing for a container it does
                    // not hold; anything else is asked about.
                    let irrelevant = network.is_some_and(|n| !self.serves_network(n))
                        && self.writer.reader().get(&id).is_none()
                        && network.is_none_or(|n| n != GATEWAY_BRIDGE);
                    if !irrelevant {
                        work.inspect(id);
                    }
                }
                // Listed again in the guard; when the served networks changed with it, the
                // containers are filtered anew.
                "create" | "destroy" | "remove" if self.refresh_networks(docker).await? => {
                    self.full_sync(docker, false).await?;
                    work.synced(&self.writer.reader());
                }
                _ => {}
            },
            _ => {}
        }
        Ok(())
    }

    /// Everything in doubt until the engine has been listed again: callers wait (bounded) rather
    /// than be served from what the index held.
    async fn relist(&mut self, docker: &Docker, work: &mut Work) -> Result<(), SessionError> {
        self.writer.set_unready();
        self.full_sync(docker, false).await?;
        work.synced(&self.writer.reader());
        self.writer.set_ready();
        Ok(())
    }

    /// Applies `change`; every container the index is in doubt about because of it (one that
    /// lost an address before it was seen to stop) is asked about again — once: a container
    /// displaced again by the answer stays in doubt, with a warning (two running containers
    /// claiming one address is not something to guess about).
    fn apply(&mut self, change: Change, work: &mut Work) {
        match &change {
            Change::Upsert(c) => {
                let at = work.tick();
                work.applied.insert(c.id.clone(), at);
            }
            Change::Remove { id } => {
                work.applied.remove(id);
            }
            Change::Replace(_) | Change::Doubt { .. } => {}
        }
        for id in self.writer.apply(change) {
            if work.displaced.insert(id.clone()) {
                work.inspect(id);
            } else {
                tracing::warn!(container = %short(&id), "the engine gives an address of this container to another one too; its addresses stay unserved until that changes");
            }
        }
    }

    /// Applies what the engine answered, unless something newer about the same container has
    /// happened since it was asked.
    fn finish(&mut self, done: Done, work: &mut Work) -> Result<(), SessionError> {
        match done {
            Done::Inspected {
                id,
                asked_at,
                record,
            } => {
                if !work.is_current(&id, asked_at) {
                    return Ok(());
                }
                match record?.and_then(|r| self.to_container(*r)) {
                    Some((c, _))
                        if overtaken(&self.writer.reader(), &work.applied, &c, asked_at) =>
                    {
                        // Older than the record that holds one of its addresses: asked again.
                        work.inspect(id);
                    }
                    Some((c, pidfd)) => {
                        self.apply(Change::Upsert(c.clone()), work);
                        if let Some(pidfd) = pidfd {
                            self.watch(&c, pidfd);
                        }
                    }
                    None => self.apply(Change::Remove { id }, work),
                }
            }
            Done::Listed { asked, holders } => {
                let index = self.writer.reader();
                let mut ids = holders?;
                // An owner in doubt is asked about whether or not the listing shows it.
                for ip in &asked {
                    if let Some(owner) = index.owner_in_doubt(*ip) {
                        ids.push(owner.id.clone());
                    }
                }
                for id in ids {
                    work.inspect(id);
                }
            }
        }
        Ok(())
    }
}

/// What the engine said of one container: its record, the `docker_gwbridge` endpoints when
/// that bridge is served, and its init process when it could be opened.
struct Record {
    details: ContainerInspectResponse,
    gateway: HashMap<String, Vec<IpAddr>>,
    pidfd: Option<Pidfd>,
}

/// A finished round trip to the engine.
enum Done {
    Inspected {
        id: String,
        /// The event sequence number when it was asked.
        asked_at: u64,
        record: Result<Option<Box<Record>>, SessionError>,
    },
    Listed {
        asked: Vec<IpAddr>,
        /// The running containers that hold one of the asked addresses.
        holders: Result<Vec<String>, SessionError>,
    },
}

/// Round trips to the engine in flight, and what is needed to apply their answers in order.
///
/// `seq` counts what happens (a question asked, a removal, a record applied). An inspect's answer
/// is applied only if it is the latest asked for that container, the container was not removed
/// after it was asked (a record taken before a container died must not bring it back), and no
/// address it claims is held by a container whose record was applied after it was asked (an
/// older answer never displaces a newer one; it is asked again).
#[derive(Default)]
struct Work {
    seq: u64,
    /// When each indexed container's record was applied.
    applied: HashMap<String, u64>,
    inflight: futures::stream::FuturesUnordered<BoxFuture<'static, Done>>,
    /// Containers to inspect when a slot frees (beyond `MAX_INFLIGHT`), oldest first.
    queued: VecDeque<(String, u64)>,
    /// The latest `seq` an inspect was asked at, per container.
    latest: HashMap<String, u64>,
    /// The `seq` of each container's last removal, while inspects asked before it may be out.
    removed_at: HashMap<String, u64>,
    /// Containers asked about because they were displaced, since the last quiet moment.
    displaced: HashSet<String>,
}

/// Round trips to the engine at once: enough to keep up with a busy host, few enough not to
/// flood the engine.
const MAX_INFLIGHT: usize = 16;

impl Work {
    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn inspect(&mut self, id: String) {
        let at = self.tick();
        self.latest.insert(id.clone(), at);
        self.queued.push_back((id, at));
    }

    fn removed(&mut self, id: &str) {
        let at = self.tick();
        self.removed_at.insert(id.to_string(), at);
    }

    /// After a full listing: every answer asked before it is stale, and every container in the
    /// index was recorded now.
    fn synced(&mut self, index: &Index) {
        let at = self.tick();
        self.forget_before(at);
        self.applied = index
            .containers()
            .iter()
            .map(|c| (c.id.clone(), at))
            .collect();
    }

    fn is_current(&mut self, id: &str, asked_at: u64) -> bool {
        let latest = self.latest.get(id).copied();
        let removed_after = self.removed_at.get(id).is_some_and(|r| *r > asked_at);
        if latest == Some(asked_at) {
            self.latest.remove(id);
        }
        latest == Some(asked_at) && !removed_after
    }

    /// A full listing at `seq` made every answer asked before it stale.
    fn forget_before(&mut self, seq: u64) {
        self.latest.retain(|_, asked| *asked >= seq);
        self.queued.retain(|(_, asked)| *asked >= seq);
    }

    fn start_queued(&mut self, docker: &Docker, watcher: &Watcher) {
        while self.inflight.len() < MAX_INFLIGHT
            && let Some((id, asked_at)) = self.queued.pop_front()
        {
            if self.latest.get(&id) != Some(&asked_at) {
                continue; // asked again since: only the latest goes out
            }
            let (docker, served, stats) = (
                docker.clone(),
                watcher.served.clone(),
                watcher.stats.clone(),
            );
            self.inflight.push(Box::pin(async move {
                let record = fetch_record(&docker, &id, &served, &stats)
                    .await
                    .map(|r| r.map(Box::new));
                Done::Inspected {
                    id,
                    asked_at,
                    record,
                }
            }));
        }
        if self.inflight.is_empty() && self.queued.is_empty() {
            // Quiet: nothing asked before now can come back.
            self.removed_at.clear();
            self.displaced.clear();
        }
    }

    /// Finds the running containers that hold `asked` (one listing), to be inspected.
    fn look(&mut self, docker: &Docker, watcher: &Watcher, asked: Vec<IpAddr>) {
        let (docker, served, stats) = (
            docker.clone(),
            watcher.served.clone(),
            watcher.stats.clone(),
        );
        self.inflight.push(Box::pin(async move {
            let holders = holders_of(&docker, &served, &stats, &asked).await;
            Done::Listed { asked, holders }
        }));
    }
}

/// Whether an answer about `c`, asked at `asked_at`, claims an address held by another container
/// whose record was applied after that: the answer is the older of the two.
fn overtaken(index: &Index, applied: &HashMap<String, u64>, c: &Container, asked_at: u64) -> bool {
    c.addresses.iter().any(|ip| {
        index
            .lookup(*ip)
            .or_else(|| index.owner_in_doubt(*ip))
            .is_some_and(|holder| {
                holder.id != c.id && applied.get(&holder.id).is_some_and(|at| *at > asked_at)
            })
    })
}

/// The running containers that hold one of `asked` on a served network (or on
/// `docker_gwbridge`), by id.
async fn holders_of(
    docker: &Docker,
    served: &BTreeSet<String>,
    stats: &DockerStats,
    asked: &[IpAddr],
) -> Result<Vec<String>, SessionError> {
    let running = list_running(docker, stats).await?;
    let gateway = gateway_endpoints(docker, served, stats).await?;
    Ok(running
        .into_iter()
        .filter_map(|summary| {
            let id = summary.id?;
            let holds = summary
                .network_settings
                .and_then(|n| n.networks)
                .unwrap_or_default()
                .iter()
                .filter(|(name, _)| served.contains(*name))
                .flat_map(|(_, e)| endpoint_addresses(e))
                .chain(gateway.get(&id).into_iter().flatten().copied())
                .any(|a| asked.contains(&a.to_canonical()));
            holds.then_some(id)
        })
        .collect())
}

/// A container's record (with its service's labels for a Swarm task, and the `docker_gwbridge`
/// endpoints when that bridge is served), or `None` if it is gone or not running.
async fn fetch_record(
    docker: &Docker,
    id: &str,
    served: &BTreeSet<String>,
    stats: &DockerStats,
) -> Result<Option<Record>, SessionError> {
    let Some((details, pidfd)) = fetch_details(docker, id, stats).await? else {
        return Ok(None);
    };
    // Read after the container's own record: an address listed now belongs to the container
    // found running (or to a later run of it), never to a predecessor on that address.
    let gateway = gateway_endpoints(docker, served, stats).await?;
    Ok(Some(Record {
        details,
        gateway,
        pidfd,
    }))
}

/// The running containers. A listing the engine answers with a record imdsd cannot read is
/// asked again, a few times: Podman lists a container that is stopping as running and then
/// describes it as `stopped`, a state Docker's API does not have.
async fn list_running(
    docker: &Docker,
    stats: &DockerStats,
) -> Result<Vec<bollard::models::ContainerSummary>, SessionError> {
    let options = ListContainersOptions {
        all: false,
        ..Default::default()
    };
    retry_unreadable(LIST_ATTEMPTS, || {
        stats.api_calls.fetch_add(1, Ordering::Relaxed);
        stats.lists.fetch_add(1, Ordering::Relaxed);
        docker.list_containers(Some(options.clone()))
    })
    .await
    .map_err(SessionError::from)
}

/// A running container's record with its service's labels, and its init process when it can
/// be opened; `None` if it is gone, stopped or unreadable (nothing more is asked about a
/// container that is not running).
async fn fetch_details(
    docker: &Docker,
    id: &str,
    stats: &DockerStats,
) -> Result<Option<(ContainerInspectResponse, Option<Pidfd>)>, SessionError> {
    stats.api_calls.fetch_add(1, Ordering::Relaxed);
    stats.inspects.fetch_add(1, Ordering::Relaxed);
    let mut details = match docker.inspect_container(id, None).await {
        Ok(details) => details,
        Err(e) => {
            return match inspect_failure(&e) {
                InspectFailure::Gone => Ok(None),
                InspectFailure::Unreadable { expected } => {
                    if expected {
                        tracing::debug!(container = %short(id), error = %e, "a container between its exit and its cleanup: not served");
                    } else {
                        tracing::warn!(container = %short(id), error = %e, "the engine's record of this container cannot be read: it gets no role until it can");
                    }
                    Ok(None)
                }
                InspectFailure::Session => Err(e.into()),
            };
        }
    };
    let running = details
        .state
        .as_ref()
        .is_some_and(|s| s.running == Some(true) && s.restarting != Some(true));
    if !running {
        return Ok(None);
    }
    // Opened right after the record that names it, so the pid is the record's own (and the
    // cgroup check in `Pidfd::open` catches a pid reused meanwhile).
    let pidfd = details
        .state
        .as_ref()
        .and_then(|s| s.pid)
        .filter(|p| *p > 0)
        .and_then(|p| Pidfd::open(p, id));
    add_service_labels(docker, stats, &mut details).await?;
    Ok(Some((details, pidfd)))
}

/// A Swarm task's address on `docker_gwbridge`, by container id: the engine lists it only in
/// that network's own record, never in the container's (moby/libnetwork #1082, #2417). Empty
/// unless `docker_gwbridge` is served.
async fn gateway_endpoints(
    docker: &Docker,
    served: &BTreeSet<String>,
    stats: &DockerStats,
) -> Result<HashMap<String, Vec<IpAddr>>, SessionError> {
    if !served.contains(GATEWAY_BRIDGE) {
        return Ok(HashMap::new());
    }
    stats.api_calls.fetch_add(1, Ordering::Relaxed);
    match docker
        .inspect_network(GATEWAY_BRIDGE, None::<InspectNetworkOptions>)
        .await
    {
        Ok(n) => Ok(gateway_bridge_endpoints(&n)),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(HashMap::new()),
        Err(e) => Err(e.into()),
    }
}

/// A Swarm task takes the labels of its service (`docker service create --label`) under its
/// own: a role set on the service selects it for every task, as a container label would.
async fn add_service_labels(
    docker: &Docker,
    stats: &DockerStats,
    details: &mut ContainerInspectResponse,
) -> Result<(), SessionError> {
    let Some(config) = details.config.as_mut() else {
        return Ok(());
    };
    let Some(service) = config
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_ID_LABEL))
        .filter(|s| !s.is_empty())
        .cloned()
    else {
        return Ok(());
    };
    stats.api_calls.fetch_add(1, Ordering::Relaxed);
    let spec_labels = match docker.inspect_service(&service, None).await {
        Ok(s) => s.spec.and_then(|s| s.labels).unwrap_or_default(),
        // The service is gone (its tasks are going): nothing to add.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let labels = config.labels.get_or_insert_with(HashMap::new);
    for (k, v) in spec_labels {
        labels.entry(k).or_insert(v);
    }
    Ok(())
}

async fn connect(host: &str) -> Result<Docker, SessionError> {
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        Docker::connect_with_unix(path, 30, bollard::API_DEFAULT_VERSION)?
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(
            &host.replacen("tcp://", "http://", 1),
            30,
            bollard::API_DEFAULT_VERSION,
        )?
    } else {
        return Err(SessionError::Config(format!(
            "{host:?} is not a Docker host URL (unix:///path, tcp://host:port or http://host:port)"
        )));
    };
    // Speak the engine's own API version, so old engines (API 1.41) work.
    Ok(docker.negotiate_version().await?)
}

/// Every network's gateways (network name, gateway), asked once, before the watcher runs.
pub async fn network_gateways(options: &DockerOptions) -> Result<Vec<(String, IpAddr)>, String> {
    let ask = async {
        let docker = connect(&options.host).await?;
        let listed = docker.list_networks(None::<ListNetworksOptions>).await?;
        Ok::<_, SessionError>(
            listed
                .iter()
                .filter_map(NetworkInfo::from_model)
                .flat_map(|n| {
                    n.subnets
                        .into_iter()
                        .filter_map(move |(_, g)| g.map(|g| (n.name.clone(), g)))
                        .collect::<Vec<_>>()
                })
                .collect(),
        )
    };
    match tokio::time::timeout(Duration::from_secs(5), ask).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 5 s".into()),
    }
}

/// How many times a listing with a record imdsd cannot read is asked for.
const LIST_ATTEMPTS: usize = 3;

/// `call` until it succeeds, fails otherwise than with an unreadable answer, or has been tried
/// `attempts` times (20 ms apart): an unreadable answer that is Podman's passing state.
async fn retry_unreadable<T, F, Fut>(
    attempts: usize,
    mut call: F,
) -> Result<T, bollard::errors::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, bollard::errors::Error>>,
{
    let mut tried = 1;
    loop {
        match call().await {
            Err(e)
                if tried < attempts
                    && matches!(inspect_failure(&e), InspectFailure::Unreadable { .. }) =>
            {
                tracing::debug!(error = %e, "an unreadable answer from the engine: asking again");
                tried += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// What a failed inspect means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InspectFailure {
    /// The container is gone (between the event and the inspect): it holds no address.
    Gone,
    /// The engine answered with a record imdsd cannot read. A container imdsd cannot read is
    /// one it cannot vouch for: it holds no address (its callers are unknown) until a later
    /// record can be read, and the session goes on for everyone else. `expected` for the one
    /// case known to be harmless: Podman reports the state `stopped`, which Docker's API does
    /// not have, between a container's exit and its cleanup.
    Unreadable { expected: bool },
    /// Anything else (the engine is unreachable or failing): the session ends.
    Session,
}

pub(crate) fn inspect_failure(e: &bollard::errors::Error) -> InspectFailure {
    use bollard::errors::Error;
    match e {
        Error::DockerResponseServerError {
            status_code: 404, ..
        } => InspectFailure::Gone,
        // Podman 4.3 answers 500 for a container removed while it looked it up.
        Error::DockerResponseServerError {
            status_code: 500,
            message,
        } if message.contains("does not exist in database")
            || message.contains("no such container") =>
        {
            InspectFailure::Gone
        }
        Error::JsonDataError { message, .. } => InspectFailure::Unreadable {
            expected: message.contains("`stopped`"),
        },
        Error::JsonSerdeError { err } => InspectFailure::Unreadable {
            expected: err.to_string().contains("`stopped`"),
        },
        _ => InspectFailure::Session,
    }
}

/// What a container event means for the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    /// The container stopped or is gone: its addresses are released at once.
    Remove,
    /// The container may have started, moved or changed: the engine is asked again.
    Reinspect,
    /// Nothing that changes who holds an address.
    Ignore,
    /// An action imdsd does not know: the container's addresses are in doubt until it has asked.
    Unknown,
}

/// Reads a container event's action, Docker's and Podman's names alike (`die`/`died`,
/// `destroy`/`remove`). Actions carry details after a colon (`exec_start: sh -c …`,
/// `health_status: healthy`).
fn container_effect(action: &str) -> Effect {
    let verb = action.split(':').next().unwrap_or_default().trim();
    match verb {
        // Stopped, gone, or (Podman) cleaned up after stopping or checkpointed.
        "die" | "died" | "destroy" | "remove" | "stop" | "exited" | "cleanup" | "checkpoint" => {
            Effect::Remove
        }
        // Running now, perhaps as a new incarnation or under a new name or configuration.
        "start" | "restart" | "rename" | "update" | "restore" | "refresh" | "sync" => {
            Effect::Reinspect
        }
        // Nothing that moves an address: a container that is created or initialised is not
        // running yet (its `start` follows); one that is killed, runs out of memory or is
        // paused has not stopped (its `die` follows if it does).
        "create" | "init" | "kill" | "oom" | "pause" | "unpause" | "attach" | "detach"
        | "commit" | "copy" | "archive-path" | "extract-to-dir" | "export" | "exec_create"
        | "exec_start" | "exec_die" | "exec_detach" | "exec" | "exec_died" | "health_status"
        | "resize" | "top" | "mount" | "unmount" => Effect::Ignore,
        _ => Effect::Unknown,
    }
}

/// The 12-character form of a container id, for logs.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Every container's addresses in a `docker_gwbridge` record (`Containers`: id → endpoint with
/// `IPv4Address` in CIDR form). Keys that are not container ids (`ingress-sbox`) find no
/// container and are harmless.
pub fn gateway_bridge_endpoints(
    network: &bollard::models::NetworkInspect,
) -> HashMap<String, Vec<IpAddr>> {
    network
        .containers
        .iter()
        .flatten()
        .map(|(id, endpoint)| {
            let addresses = [
                endpoint.ipv4_address.as_deref(),
                endpoint.ipv6_address.as_deref(),
            ]
            .into_iter()
            .flatten()
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect();
            (id.clone(), addresses)
        })
        .collect()
}

/// The first address after the network address (`10.0.0.1` in `10.0.0.0/24`, `fd00::1` in
/// `fd00::/64`).
fn first_host(net: IpNet) -> Option<IpAddr> {
    net.hosts().find(|ip| *ip != net.network())
}

fn endpoint_addresses(e: &bollard::models::EndpointSettings) -> Vec<IpAddr> {
    [e.ip_address.as_deref(), e.global_ipv6_address.as_deref()]
        .into_iter()
        .flatten()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Converts an inspect response into what the index keeps: only the addresses on `served`
/// networks, and a Swarm task's `docker_gwbridge` address from `gateway` (container id →
/// addresses) when that bridge is served.
pub(crate) fn to_container(
    details: ContainerInspectResponse,
    options: &DockerOptions,
    served: &BTreeSet<String>,
    gateway: &HashMap<String, Vec<IpAddr>>,
) -> Option<Container> {
    let state = details.state?;
    if state.running != Some(true) || state.restarting == Some(true) {
        return None;
    }
    let id = details.id?;
    let config = details.config.unwrap_or_default();
    let mut addresses = Vec::new();
    let mut networks = Vec::new();
    let mut endpoints: Vec<(String, bollard::models::EndpointSettings)> = details
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .collect();
    endpoints.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, endpoint) in endpoints {
        if !served.contains(&name) {
            continue;
        }
        addresses.extend(endpoint_addresses(&endpoint));
        networks.push(name);
    }
    if served.contains(GATEWAY_BRIDGE)
        && let Some(bridged) = gateway.get(&id).filter(|a| !a.is_empty())
        && !networks.iter().any(|n| n == GATEWAY_BRIDGE)
    {
        addresses.extend(bridged);
        networks.push(GATEWAY_BRIDGE.to_string());
    }
    if networks.is_empty() {
        // On no served network: it cannot be told apart by an address imdsd serves.
        return None;
    }
    let env = kept(
        &options.env_keys,
        config.env.unwrap_or_default().into_iter().filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        }),
    );
    Some(Container {
        id,
        name: details
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        started_at: state.started_at.unwrap_or_default(),
        image: config.image.unwrap_or_default(),
        addresses,
        networks,
        labels: kept(&options.label_keys, config.labels.unwrap_or_default()),
        env,
    })
}

/// The pairs whose key is one of `keys`: what the index keeps of a container's environment and
/// labels.
pub(crate) fn kept(
    keys: &[String],
    pairs: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .filter(|(k, _)| keys.iter().any(|key| key == k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerConfig, ContainerState, EndpointSettings, NetworkSettings};

    fn details(running: bool, networks: &[(&str, &str)]) -> ContainerInspectResponse {
        ContainerInspectResponse {
            id: Some("f".repeat(64)),
            name: Some("/web_1".into()),
            state: Some(ContainerState {
                running: Some(running),
                started_at: Some("2026-01-01T00:00:00.1Z".into()),
                ..Default::default()
            }),
            config: Some(ContainerConfig {
                image: Some("app:1".into()),
                env: Some(vec![
                    "IAM_ROLE=app".into(),
                    "SECRET=x".into(),
                    "PATH=/bin".into(),
                ]),
                labels: Some(
                    [
                        ("imdsd.role".to_string(), "lbl".to_string()),
                        (
                            "com.docker.compose.project.working_dir".to_string(),
                            "/home/someone/src/app".to_string(),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            }),
            network_settings: Some(NetworkSettings {
                networks: Some(
                    networks
                        .iter()
                        .map(|(name, ip)| {
                            (
                                (*name).to_string(),
                                EndpointSettings {
                                    ip_address: Some((*ip).to_string()),
                                    global_ipv6_address: Some(String::new()),
                                    ..Default::default()
                                },
                            )
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn options() -> DockerOptions {
        DockerOptions {
            host: "unix:///var/run/docker.sock".into(),
            resync_every: Duration::from_secs(60),
            env_keys: vec!["IAM_ROLE".into()],
            label_keys: vec!["imdsd.role".into()],
            networks: NetworkScope::All,
        }
    }

    fn served(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_string()).collect()
    }

    #[test]
    fn only_the_variables_and_labels_imdsd_reads_are_kept() {
        let c = to_container(
            details(true, &[("net", "172.18.0.2")]),
            &options(),
            &served(&["net"]),
            &HashMap::new(),
        )
        .expect("running");
        assert_eq!(c.name, "web_1");
        assert_eq!(c.env.len(), 1);
        assert_eq!(c.env["IAM_ROLE"], "app");
        assert_eq!(c.labels.len(), 1);
        assert_eq!(c.labels["imdsd.role"], "lbl");
        assert_eq!(
            c.addresses,
            vec!["172.18.0.2".parse::<IpAddr>().expect("ip")]
        );
    }

    #[test]
    fn a_subnet_without_a_gateway_has_its_first_address_as_the_host() {
        let v6: IpNet = "fd00:db8:1::/64".parse().expect("net");
        assert_eq!(first_host(v6), Some("fd00:db8:1::1".parse().expect("ip")));
        let v4: IpNet = "169.254.7.0/24".parse().expect("net");
        assert_eq!(first_host(v4), Some("169.254.7.1".parse().expect("ip")));
    }

    #[test]
    fn stopped_containers_are_not_indexed() {
        assert!(
            to_container(
                details(false, &[("net", "172.18.0.2")]),
                &options(),
                &served(&["net"]),
                &HashMap::new(),
            )
            .is_none()
        );
    }

    #[test]
    fn the_network_filter_keeps_only_served_networks() {
        let d = details(true, &[("served", "172.18.0.2"), ("other", "172.19.0.2")]);
        let c = to_container(d, &options(), &served(&["served"]), &HashMap::new())
            .expect("on a served network");
        assert_eq!(c.networks, vec!["served".to_string()]);
        assert_eq!(c.addresses.len(), 1);
        let d = details(true, &[("other", "172.19.0.2")]);
        assert!(to_container(d, &options(), &served(&["served"]), &HashMap::new()).is_none());
    }

    #[test]
    fn a_container_gone_or_unreadable_is_not_served_and_does_not_end_the_session() {
        // Podman 4.3's record of a container that has exited but is not cleaned up yet.
        let stopped = serde_json::json!({
            "Id": "f".repeat(64),
            "State": {"Status": "stopped", "Running": false, "Pid": 0, "ExitCode": 0},
            "Name": "/app"
        });
        let err = serde_json::from_value::<ContainerInspectResponse>(stopped)
            .expect_err("Docker's API has no state `stopped`");
        assert_eq!(
            inspect_failure(&err.into()),
            InspectFailure::Unreadable { expected: true }
        );
        let odd = serde_json::from_value::<ContainerInspectResponse>(serde_json::json!({
            "Id": "f".repeat(64),
            "State": {"Status": "hibernating", "Running": true},
        }))
        .expect_err("an unknown state");
        assert_eq!(
            inspect_failure(&odd.into()),
            InspectFailure::Unreadable { expected: false }
        );
        let gone = bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            message: "no such container".into(),
        };
        assert_eq!(inspect_failure(&gone), InspectFailure::Gone);
        // What Podman says of a container removed while it looked it up.
        let removed = bollard::errors::Error::DockerResponseServerError {
            status_code: 500,
            message: format!(
                "container {} does not exist in database: no such container",
                "f".repeat(64)
            ),
        };
        assert_eq!(inspect_failure(&removed), InspectFailure::Gone);
        let failing = bollard::errors::Error::DockerResponseServerError {
            status_code: 500,
            message: "database is locked".into(),
        };
        assert_eq!(inspect_failure(&failing), InspectFailure::Session);
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_podman_answers_with_a_passing_state_is_asked_for_again() {
        let stopped = || -> bollard::errors::Error {
            serde_json::from_value::<bollard::models::ContainerSummary>(
                serde_json::json!({"Id": "f".repeat(64), "State": "stopped"}),
            )
            .expect_err("Docker's API has no state `stopped`")
            .into()
        };
        let mut calls = 0;
        let listed = retry_unreadable(3, || {
            calls += 1;
            let answer = if calls < 3 { Err(stopped()) } else { Ok(calls) };
            async move { answer }
        })
        .await;
        assert_eq!(listed.expect("the third answer"), 3);
        // Only so often; and a failing engine is not asked again here.
        let mut calls = 0;
        let listed: Result<(), _> = retry_unreadable(3, || {
            calls += 1;
            let e = stopped();
            async move { Err(e) }
        })
        .await;
        assert!(listed.is_err());
        assert_eq!(calls, 3);
        let mut calls = 0;
        let listed: Result<(), _> = retry_unreadable(3, || {
            calls += 1;
            async {
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 500,
                    message: "database is locked".into(),
                })
            }
        })
        .await;
        assert!(listed.is_err());
        assert_eq!(calls, 1);
    }

    #[test]
    fn docker_and_podman_events_are_read_alike_and_unknown_ones_are_not_ignored() {
        for (action, effect) in [
            ("die", Effect::Remove),
            ("died", Effect::Remove),
            ("destroy", Effect::Remove),
            ("remove", Effect::Remove),
            ("stop", Effect::Remove),
            ("cleanup", Effect::Remove),
            ("start", Effect::Reinspect),
            ("restart", Effect::Reinspect),
            ("rename", Effect::Reinspect),
            ("create", Effect::Ignore),
            ("kill", Effect::Ignore),
            ("exec_start: sh -c true", Effect::Ignore),
            ("health_status: healthy", Effect::Ignore),
            ("attach", Effect::Ignore),
            ("teleport", Effect::Unknown),
            ("", Effect::Unknown),
        ] {
            assert_eq!(container_effect(action), effect, "{action:?}");
        }
    }

    #[test]
    fn an_answer_about_a_container_removed_or_asked_about_again_meanwhile_is_not_applied() {
        let mut work = Work::default();
        work.inspect("a".into());
        let asked_a = work.seq;
        work.removed("a");
        assert!(
            !work.is_current("a", asked_a),
            "a record taken before the stop"
        );
        work.inspect("b".into());
        let first = work.seq;
        work.inspect("b".into());
        let second = work.seq;
        assert!(
            !work.is_current("b", first),
            "only the latest question counts"
        );
        assert!(work.is_current("b", second));
        // A full listing makes every answer asked before it stale.
        work.inspect("c".into());
        let before = work.seq;
        work.synced(&crate::index::index().0);
        assert!(!work.is_current("c", before));
    }

    #[test]
    fn an_answer_older_than_the_record_that_holds_its_address_is_overtaken() {
        let (index, mut writer) = crate::index::index();
        let mut work = Work::default();
        let record = |id: &str| {
            let mut c = to_container(
                details(true, &[("net", "172.18.0.2")]),
                &options(),
                &served(&["net"]),
                &HashMap::new(),
            )
            .expect("running");
            c.id = id.repeat(64);
            c
        };
        // A's inspect is asked; meanwhile B's record is applied, holding the same address.
        work.inspect("a".repeat(64));
        let asked_a = work.seq;
        let b = record("b");
        let _ = writer.apply(Change::Upsert(b.clone()));
        let at = work.tick();
        work.applied.insert(b.id.clone(), at);
        assert!(overtaken(&index, &work.applied, &record("a"), asked_a));
        // Asked after B's record was applied, A's answer is the newer one.
        work.inspect("a".repeat(64));
        assert!(!overtaken(&index, &work.applied, &record("a"), work.seq));
        // B's own answer never overtakes itself.
        assert!(!overtaken(&index, &work.applied, &b, asked_a));
    }

    #[test]
    fn a_swarm_tasks_gateway_bridge_address_is_its_own() {
        let gwbridge: bollard::models::NetworkInspect = serde_json::from_value(serde_json::json!({
            "Name": "docker_gwbridge",
            "Containers": {
                "f".repeat(64): {"Name": "gateway_46310f696a14", "IPv4Address": "172.18.0.3/16", "IPv6Address": ""},
                "ingress-sbox": {"Name": "gateway_ingress-sbox", "IPv4Address": "172.18.0.2/16"}
            }
        }))
        .expect("a network record");
        let endpoints = gateway_bridge_endpoints(&gwbridge);
        assert_eq!(endpoints[&"f".repeat(64)], vec![ip("172.18.0.3")]);
        // The task's own record lists only its overlay network, which is not served.
        let task = details(true, &[("ov1", "169.254.201.3")]);
        let c = to_container(
            task.clone(),
            &options(),
            &served(&[GATEWAY_BRIDGE]),
            &endpoints,
        )
        .expect("served through docker_gwbridge");
        assert_eq!(c.addresses, vec![ip("172.18.0.3")]);
        assert_eq!(c.networks, vec![GATEWAY_BRIDGE.to_string()]);
        // Unless docker_gwbridge is served, the bridge's record is not used.
        assert!(to_container(task, &options(), &served(&["other"]), &endpoints).is_none());
    }

    fn network(name: &str, subnet: &str, gateway: &str, bridge: &str) -> NetworkInfo {
        NetworkInfo {
            name: name.into(),
            subnets: vec![(
                subnet.parse().expect("net"),
                Some(gateway.parse().expect("ip")),
            )],
            bridge: Some(bridge.into()),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    /// The default bridge, the host layout's metadata network, and a compose project's network.
    fn networks() -> Vec<NetworkInfo> {
        vec![
            network("bridge", "172.17.0.0/16", "172.17.0.1", "docker0"),
            network(
                "ec2_metadata",
                "169.254.169.0/24",
                "169.254.169.254",
                "imdsd0",
            ),
            network(
                "app_default",
                "172.20.0.0/16",
                "172.20.0.1",
                "br-0123456789ab",
            ),
        ]
    }

    /// The host's interfaces in the host layout (`imdsd network up`).
    fn host_interfaces() -> Vec<(String, IpAddr)> {
        vec![
            ("lo".into(), ip("127.0.0.1")),
            ("eth0".into(), ip("10.0.2.15")),
            ("docker0".into(), ip("172.17.0.1")),
            ("imdsd0".into(), ip("169.254.169.254")),
            ("br-0123456789ab".into(), ip("172.20.0.1")),
        ]
    }

    #[test]
    fn by_default_only_the_network_that_carries_the_listen_address_is_served() {
        let served = |addrs: &[&str], local: &[(String, IpAddr)]| {
            let scope = NetworkScope::Carrying(addrs.iter().map(|a| ip(a)).collect());
            served_networks(&scope, &networks(), local)
                .into_iter()
                .collect::<Vec<_>>()
        };
        // Host layout: imdsd on the metadata network's gateway; `bridge` reaches that address
        // through the host's routing, but it is not attached.
        assert_eq!(
            served(&["169.254.169.254"], &host_interfaces()),
            ["ec2_metadata"]
        );
        // Compose layout: imdsd's own container holds the address; no host bridges in view.
        let in_container = vec![("eth0".to_string(), ip("169.254.169.254"))];
        assert_eq!(
            served(&["169.254.169.254"], &in_container),
            ["ec2_metadata"]
        );
        // EC2 layout: imdsd on docker0's own address, where the redirect sends containers.
        assert_eq!(served(&["172.17.0.1"], &host_interfaces()), ["bridge"]);
        // The docker0 variant: 169.254.169.254 added to docker0 by hand (no metadata network).
        let docker0_variant = vec![
            ("docker0".to_string(), ip("172.17.0.1")),
            ("docker0".to_string(), ip("169.254.169.254")),
        ];
        let without_metadata_network: Vec<NetworkInfo> = networks()
            .into_iter()
            .filter(|n| n.name != "ec2_metadata")
            .collect();
        let scope = NetworkScope::Carrying(vec![ip("169.254.169.254")]);
        assert_eq!(
            served_networks(&scope, &without_metadata_network, &docker0_variant)
                .into_iter()
                .collect::<Vec<_>>(),
            ["bridge"]
        );
        // Loopback (the quick start) carries no network: no container is served.
        assert!(served(&["127.0.0.1"], &host_interfaces()).is_empty());
        // Listening everywhere is every network that carries one of the host's addresses.
        assert_eq!(
            served(&["0.0.0.0"], &host_interfaces()),
            ["app_default", "bridge", "ec2_metadata"]
        );
    }

    #[test]
    fn named_networks_and_every_network_are_served_as_told() {
        let named = NetworkScope::Named(vec!["app_default".into(), "missing".into()]);
        assert_eq!(
            served_networks(&named, &networks(), &[])
                .into_iter()
                .collect::<Vec<_>>(),
            ["app_default"]
        );
        assert_eq!(
            served_networks(&NetworkScope::All, &networks(), &[]).len(),
            3
        );
    }

    #[test]
    fn a_network_listing_entry_gives_its_bridge_and_gateways() {
        let listed: bollard::models::Network = serde_json::from_value(serde_json::json!({
            "Name": "app_default",
            "Id": "0123456789abcdef0123456789abcdef",
            "Driver": "bridge",
            "IPAM": {"Config": [
                {"Subnet": "172.20.0.0/16", "Gateway": "172.20.0.1"},
                {"Subnet": "fd00:db8::/64"}
            ]},
            "Options": {}
        }))
        .expect("a network");
        let n = NetworkInfo::from_model(&listed).expect("named");
        assert_eq!(n.bridge.as_deref(), Some("br-0123456789ab"));
        assert_eq!(
            n.subnets,
            vec![
                (
                    "172.20.0.0/16".parse().expect("net"),
                    Some(ip("172.20.0.1"))
                ),
                (
                    "fd00:db8::/64".parse().expect("net"),
                    Some(ip("fd00:db8::1"))
                ),
            ]
        );
    }
}
