//! The container index: which running container owns which IP address, mirrored from the Docker
//! Engine by the watcher in [`crate::docker`]. Pure data and notifications; no I/O.
//!
//! One [`IndexWriter`] applies changes; any number of cheap [`Index`] readers look callers up.
//! Every change bumps a generation and wakes waiters, so a request from an address the index does
//! not know yet can wait for the watcher (bounded) instead of polling.
//!
//! While the engine cannot be reached the index keeps its entries but is not *ready*: a container
//! could stop and another take its address without imdsd seeing it, so callers are not served from
//! it until the next full sync (see [`Index::lookup_or_wait`]).
//!
//! Safety rule: an address belongs to exactly one container incarnation (id + start time). When a
//! container is removed, its addresses are released only if they still point at it, so a late event
//! for a dead container can never take an address away from the live one that reused it, and a new
//! container on a recycled address replaces the old mapping outright.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{Notify, broadcast};

/// What imdsd knows about one running container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// The full 64-character id.
    pub id: String,
    /// The name, without Docker's leading `/`.
    pub name: String,
    /// `State.StartedAt`: with the id, identifies this run of the container.
    pub started_at: String,
    pub image: String,
    /// Every address on every network, IPv4 and IPv6.
    pub addresses: Vec<IpAddr>,
    /// Names of the networks the container is attached to.
    pub networks: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Only the environment variables imdsd reads (role, external id, policy, session key).
    pub env: BTreeMap<String, String>,
}

impl Container {
    /// The 12-character id Docker shows.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }

    /// What IMDSv2 tokens issued to this container are bound to: a token is worthless to any other
    /// container, including a later one on the same address.
    pub fn binding(&self) -> String {
        format!("ctr:{}:{}", self.id, self.started_at)
    }
}

/// Who a caller is, as far as the index can tell.
#[derive(Debug, Clone)]
pub enum Lookup {
    Container(Arc<Container>),
    /// Outside every container network, or a network's gateway: the host or another machine.
    NotAContainer,
    /// Inside a container network, but no running container (that imdsd serves) has the address.
    UnknownContainer,
    /// Inside a Docker network that imdsd does not serve (one the operator did not attach to the
    /// metadata service): a container, but never one that gets a role, whoever it is.
    Unserved(Arc<str>),
    /// The index has not completed its first sync with the engine, so nobody can be told apart.
    NotSynced,
}

/// A change to apply.
#[derive(Debug, Clone)]
pub enum Change {
    /// A container started, changed networks, or was renamed.
    Upsert(Container),
    /// A container stopped or disappeared.
    Remove { id: String },
    /// A full listing: replaces everything (after a (re)connect or a periodic resync).
    Replace(Vec<Container>),
}

/// What readers can subscribe to, e.g. to prefetch credentials for new containers.
#[derive(Debug, Clone)]
pub enum IndexEvent {
    Added(Arc<Container>),
    Removed(Arc<Container>),
    /// Many changes at once (a resync); subscribers should re-read the whole index.
    Reset,
}

/// One subnet of a Docker network in view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subnet {
    /// The network's name.
    pub network: Arc<str>,
    pub net: IpNet,
    /// The network's gateway on this subnet: the host itself, never a container.
    pub gateway: Option<IpAddr>,
    /// Whether containers calling from this subnet are served (see `crate::docker::NetworkScope`).
    pub served: bool,
}

#[derive(Default)]
struct State {
    /// Looked up on every request from a container: hashed with foldhash (seeded per process),
    /// as the identity memo is.
    by_ip: foldhash::HashMap<IpAddr, Arc<Container>>,
    by_id: HashMap<String, Arc<Container>>,
    /// The subnets of the Docker networks in view.
    subnets: Vec<Subnet>,
}

impl State {
    /// The subnet `ip` belongs to as a container address (a gateway is the host, not a container).
    fn container_subnet(&self, ip: IpAddr) -> Option<&Subnet> {
        if self.subnets.iter().any(|s| s.gateway == Some(ip)) {
            return None;
        }
        // A served subnet first: should two networks' subnets overlap, serving is decided by the
        // one that serves (its containers are in the index; anything else there is unknown).
        self.subnets
            .iter()
            .filter(|s| s.net.contains(&ip))
            .max_by_key(|s| s.served)
    }
}

struct Shared {
    state: RwLock<State>,
    changed: Notify,
    generation: AtomicU64,
    ready: AtomicBool,
    ready_notify: Notify,
    events: broadcast::Sender<IndexEvent>,
}

/// The read side. Cheap to clone.
#[derive(Clone)]
pub struct Index {
    shared: Arc<Shared>,
}

/// The write side; there is one, owned by the watcher.
pub struct IndexWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("containers", &self.len())
            .field("ready", &self.is_ready())
            .finish()
    }
}

/// A new, empty index and its writer.
pub fn index() -> (Index, IndexWriter) {
    let (events, _) = broadcast::channel(1024);
    let shared = Arc::new(Shared {
        state: RwLock::new(State::default()),
        changed: Notify::new(),
        generation: AtomicU64::new(0),
        ready: AtomicBool::new(false),
        ready_notify: Notify::new(),
        events,
    });
    (
        Index {
            shared: shared.clone(),
        },
        IndexWriter { shared },
    )
}

impl Index {
    /// The container that owns `ip`, if the index knows one.
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<Container>> {
        self.read().by_ip.get(&ip.to_canonical()).cloned()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Container>> {
        self.read().by_id.get(id).cloned()
    }

    /// Finds who is calling from `ip`, waiting up to `timeout` while the answer may still change:
    /// while the index has not finished its first sync, or while `ip` lies in a container network
    /// but belongs to no known container (it may have just started; its event is on the way).
    /// Wakes on index changes, not on a timer.
    pub async fn lookup_or_wait(&self, ip: IpAddr, timeout: Duration) -> Lookup {
        let ip = ip.to_canonical();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let ready = self.is_ready();
            if ready && let Some(c) = self.lookup(ip) {
                return Lookup::Container(c);
            }
            if ready {
                match self.container_subnet(ip) {
                    None => return Lookup::NotAContainer,
                    // Nothing to wait for: no container there is ever served.
                    Some(s) if !s.served => return Lookup::Unserved(s.network),
                    Some(_) => {}
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                if !self.is_ready() {
                    return Lookup::NotSynced;
                }
                return match self.lookup(ip) {
                    Some(c) => Lookup::Container(c),
                    None => match self.container_subnet(ip) {
                        Some(s) if !s.served => Lookup::Unserved(s.network),
                        Some(_) => Lookup::UnknownContainer,
                        None => Lookup::NotAContainer,
                    },
                };
            }
        }
    }

    /// True when `ip` lies in a Docker network's subnet and is not its gateway: such a caller is a
    /// container, known or not, and must never be mistaken for the host.
    pub fn is_container_address(&self, ip: IpAddr) -> bool {
        self.container_subnet(ip).is_some()
    }

    /// The subnet `ip` lies in as a container address, if any.
    fn container_subnet(&self, ip: IpAddr) -> Option<Subnet> {
        self.read().container_subnet(ip.to_canonical()).cloned()
    }

    /// The subnets of the Docker networks in view, for the admin API and doctor.
    pub fn subnets(&self) -> Vec<Subnet> {
        self.read().subnets.clone()
    }

    /// Every container, for the admin API and resubscribers.
    pub fn containers(&self) -> Vec<Arc<Container>> {
        self.read().by_id.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bumped on every change.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// True while the index mirrors the engine: after a full listing, until the connection to the
    /// engine is lost.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Waits until the first full listing has been applied.
    pub async fn wait_ready(&self) {
        loop {
            let notified = self.shared.ready_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<IndexEvent> {
        self.shared.events.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl IndexWriter {
    /// Applies one change and wakes everyone waiting for one.
    pub fn apply(&mut self, change: Change) {
        let mut events = Vec::new();
        {
            let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
            match change {
                Change::Upsert(container) => {
                    let container = Arc::new(container);
                    if let Some(old) = remove(&mut state, &container.id) {
                        if *old == *container {
                            // Nothing changed; keep the existing entry and its identity.
                            insert(&mut state, old);
                            return;
                        }
                        events.push(IndexEvent::Removed(old));
                    }
                    for displaced in insert(&mut state, container.clone()) {
                        tracing::warn!(
                            container = %displaced.name,
                            id = %displaced.short_id(),
                            now = %container.name,
                            "an address moved to another container before its previous owner was seen to stop"
                        );
                    }
                    events.push(IndexEvent::Added(container));
                }
                Change::Remove { id } => {
                    if let Some(old) = remove(&mut state, &id) {
                        events.push(IndexEvent::Removed(old));
                    }
                }
                Change::Replace(containers) => {
                    state.by_ip.clear();
                    state.by_id.clear();
                    for c in containers {
                        insert(&mut state, Arc::new(c));
                    }
                    events.push(IndexEvent::Reset);
                }
            }
        }
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        self.shared.changed.notify_waiters();
        for e in events {
            // Nobody listening is fine.
            let _ = self.shared.events.send(e);
        }
    }

    /// Records the subnets of the Docker networks in view, and wakes waiters: a caller waiting
    /// on an address may now turn out to be on a network that is not served.
    pub fn set_networks(&mut self, subnets: Vec<Subnet>) {
        {
            let mut state = self.shared.state.write().unwrap_or_else(|e| e.into_inner());
            state.subnets = subnets
                .into_iter()
                .map(|s| Subnet {
                    gateway: s.gateway.map(|g| g.to_canonical()),
                    ..s
                })
                .collect();
        }
        self.shared.changed.notify_waiters();
    }

    /// Marks the index as synced (after the first full listing).
    pub fn set_ready(&mut self) {
        self.shared.ready.store(true, Ordering::Release);
        self.shared.ready_notify.notify_waiters();
        self.shared.changed.notify_waiters();
    }

    /// Marks the index as no longer authoritative (the engine connection was lost): while it
    /// cannot see events, a container may die and another take its address unseen.
    pub fn set_unready(&mut self) {
        self.shared.ready.store(false, Ordering::Release);
        self.shared.changed.notify_waiters();
    }

    /// A reader for this index.
    pub fn reader(&self) -> Index {
        Index {
            shared: self.shared.clone(),
        }
    }
}

/// Adds `c`; returns containers that lost an address to it.
fn insert(state: &mut State, c: Arc<Container>) -> Vec<Arc<Container>> {
    let mut displaced = Vec::new();
    for ip in &c.addresses {
        if let Some(previous) = state.by_ip.insert(ip.to_canonical(), c.clone())
            && previous.id != c.id
        {
            displaced.push(previous);
        }
    }
    state.by_id.insert(c.id.clone(), c);
    displaced
}

/// Removes the container `id`, releasing only the addresses that still point at it.
fn remove(state: &mut State, id: &str) -> Option<Arc<Container>> {
    let old = state.by_id.remove(id)?;
    for ip in &old.addresses {
        let ip = ip.to_canonical();
        if state.by_ip.get(&ip).is_some_and(|c| c.id == old.id) {
            state.by_ip.remove(&ip);
        }
    }
    Some(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, started: &str, ips: &[&str]) -> Container {
        Container {
            id: format!("{id:0<64}"),
            name: format!("name-{id}"),
            started_at: started.into(),
            image: "img".into(),
            addresses: ips.iter().map(|i| i.parse().expect("ip")).collect(),
            networks: vec!["net".into()],
            labels: BTreeMap::new(),
            env: BTreeMap::new(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn subnet(network: &str, net: &str, gateway: &str, served: bool) -> Subnet {
        Subnet {
            network: network.into(),
            net: net.parse().expect("net"),
            gateway: Some(ip(gateway)),
            served,
        }
    }

    /// One container network, 10.0.0.0/16 with its gateway at .1, synced and empty.
    fn synced_on_10_0(w: &mut IndexWriter) {
        w.set_networks(vec![subnet("net", "10.0.0.0/16", "10.0.0.1", true)]);
        w.apply(Change::Replace(Vec::new()));
        w.set_ready();
    }

    #[test]
    fn upsert_then_remove() {
        let (index, mut w) = index();
        w.apply(Change::Upsert(container(
            "a",
            "t1",
            &["10.0.0.2", "fd00::2"],
        )));
        assert_eq!(index.lookup(ip("10.0.0.2")).expect("known").name, "name-a");
        assert_eq!(index.lookup(ip("fd00::2")).expect("known").name, "name-a");
        assert_eq!(
            index.lookup(ip("::ffff:10.0.0.2")).expect("mapped v4").name,
            "name-a"
        );
        w.apply(Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        assert!(index.lookup(ip("10.0.0.2")).is_none());
        assert!(index.is_empty());
    }

    #[test]
    fn a_recycled_address_belongs_to_the_new_container_even_when_the_old_ones_death_arrives_late() {
        let (index, mut w) = index();
        w.apply(Change::Upsert(container("a", "t1", &["10.0.0.2"])));
        // B starts on A's address before A's removal is processed.
        w.apply(Change::Upsert(container("b", "t2", &["10.0.0.2"])));
        assert_eq!(index.lookup(ip("10.0.0.2")).expect("known").name, "name-b");
        // A's late removal does not take the address from B.
        w.apply(Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        assert_eq!(
            index.lookup(ip("10.0.0.2")).expect("still B").name,
            "name-b"
        );
    }

    #[test]
    fn a_restart_is_a_new_incarnation() {
        let a1 = container("a", "t1", &["10.0.0.2"]);
        let a2 = container("a", "t2", &["10.0.0.2"]);
        assert_ne!(a1.binding(), a2.binding());
        let (index, mut w) = index();
        w.apply(Change::Upsert(a1));
        w.apply(Change::Upsert(a2.clone()));
        assert_eq!(*index.lookup(ip("10.0.0.2")).expect("known"), a2);
    }

    #[test]
    fn replace_swaps_everything_and_drops_the_missing() {
        let (index, mut w) = index();
        w.apply(Change::Upsert(container("a", "t1", &["10.0.0.2"])));
        w.apply(Change::Replace(vec![container("b", "t1", &["10.0.0.3"])]));
        assert!(index.lookup(ip("10.0.0.2")).is_none());
        assert!(index.lookup(ip("10.0.0.3")).is_some());
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn gateways_are_not_containers() {
        let (index, mut w) = index();
        w.set_networks(vec![subnet("net", "172.18.0.0/16", "172.18.0.1", true)]);
        assert!(index.is_container_address(ip("172.18.0.7")));
        assert!(!index.is_container_address(ip("172.18.0.1")));
        assert!(!index.is_container_address(ip("127.0.0.1")));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_when_the_container_appears() {
        let (index, mut w) = index();
        synced_on_10_0(&mut w);
        let waiter = tokio::spawn({
            let index = index.clone();
            async move {
                index
                    .lookup_or_wait(ip("10.0.0.9"), Duration::from_millis(250))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        w.apply(Change::Upsert(container("late", "t1", &["10.0.0.9"])));
        let found = waiter.await.expect("join");
        assert!(matches!(found, Lookup::Container(c) if c.name == "name-late"));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let (index, mut w) = index();
        synced_on_10_0(&mut w);
        let started = tokio::time::Instant::now();
        let waiter = tokio::spawn({
            let index = index.clone();
            async move {
                index
                    .lookup_or_wait(ip("10.0.0.9"), Duration::from_millis(250))
                    .await
            }
        });
        // Unrelated changes wake the waiter but do not end the wait early.
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            w.apply(Change::Upsert(container(
                &format!("o{i}"),
                "t",
                &[&format!("10.0.1.{i}")],
            )));
        }
        assert!(matches!(
            waiter.await.expect("join"),
            Lookup::UnknownContainer
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn the_host_and_strangers_do_not_wait_once_synced() {
        let (index, mut w) = index();
        w.set_networks(vec![subnet("net", "10.0.0.0/16", "10.0.0.1", true)]);
        let started = tokio::time::Instant::now();
        let before_sync = tokio::spawn({
            let index = index.clone();
            async move {
                index
                    .lookup_or_wait(ip("192.0.2.1"), Duration::from_millis(250))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        w.apply(Change::Replace(Vec::new()));
        w.set_ready();
        // The wait ended with the first sync, not at the deadline.
        assert!(matches!(
            before_sync.await.expect("join"),
            Lookup::NotAContainer
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(10));
        for host in ["10.0.0.1", "192.0.2.1"] {
            let l = index
                .lookup_or_wait(ip(host), Duration::from_millis(250))
                .await;
            assert!(matches!(l, Lookup::NotAContainer), "{host}: {l:?}");
        }
        assert_eq!(started.elapsed(), Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_on_a_network_that_is_not_served_is_told_at_once() {
        let (index, mut w) = index();
        w.set_networks(vec![
            subnet("metadata", "169.254.169.0/24", "169.254.169.254", true),
            subnet("bridge", "172.17.0.0/16", "172.17.0.1", false),
        ]);
        w.apply(Change::Replace(vec![container(
            "a",
            "t1",
            &["169.254.169.2"],
        )]));
        w.set_ready();
        let started = tokio::time::Instant::now();
        let l = index
            .lookup_or_wait(ip("172.17.0.5"), Duration::from_millis(250))
            .await;
        assert!(
            matches!(&l, Lookup::Unserved(n) if &**n == "bridge"),
            "{l:?}"
        );
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait for an unserved network"
        );
        // The unserved network's gateway is the host, as any gateway is.
        let l = index
            .lookup_or_wait(ip("172.17.0.1"), Duration::from_millis(250))
            .await;
        assert!(matches!(l, Lookup::NotAContainer), "{l:?}");
        // A served network still waits for a container it does not know yet.
        let l = index
            .lookup_or_wait(ip("169.254.169.9"), Duration::from_millis(250))
            .await;
        assert!(matches!(l, Lookup::UnknownContainer), "{l:?}");
        assert_eq!(started.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnected_index_serves_nobody_until_it_resyncs() {
        let (index, mut w) = index();
        w.apply(Change::Replace(vec![container("a", "t1", &["10.0.0.2"])]));
        w.set_ready();
        assert!(matches!(
            index.lookup_or_wait(ip("10.0.0.2"), Duration::ZERO).await,
            Lookup::Container(_)
        ));
        w.set_unready();
        let l = index
            .lookup_or_wait(ip("10.0.0.2"), Duration::from_millis(250))
            .await;
        assert!(matches!(l, Lookup::NotSynced), "{l:?}");
        w.apply(Change::Replace(vec![container("a", "t1", &["10.0.0.2"])]));
        w.set_ready();
        assert!(matches!(
            index.lookup_or_wait(ip("10.0.0.2"), Duration::ZERO).await,
            Lookup::Container(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_index_that_never_syncs_says_so() {
        let (index, _w) = index();
        let l = index
            .lookup_or_wait(ip("10.0.0.9"), Duration::from_millis(250))
            .await;
        assert!(matches!(l, Lookup::NotSynced));
    }

    #[tokio::test]
    async fn subscribers_hear_about_changes() {
        let (index, mut w) = index();
        let mut rx = index.subscribe();
        w.apply(Change::Upsert(container("a", "t1", &["10.0.0.2"])));
        w.apply(Change::Remove {
            id: format!("{:0<64}", "a"),
        });
        assert!(matches!(rx.recv().await, Ok(IndexEvent::Added(c)) if c.name == "name-a"));
        assert!(matches!(rx.recv().await, Ok(IndexEvent::Removed(c)) if c.name == "name-a"));
    }
}
